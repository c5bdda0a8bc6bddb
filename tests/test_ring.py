"""Unit tests of the key ring (``KeyRing``) and the ``KeyManager`` singleton around it.

Time is a fake clock the tests advance by hand: nothing sleeps, and only the tests that are
about threads start any.  No HTTP.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from stable_openai import (
    AllKeysCoolingError,
    AllKeysDisabledError,
    KeyManager,
    NoKeysError,
    _manager,
)
from stable_openai._budget import ServerBudget
from stable_openai._cause import Cause
from stable_openai._errors import StableOpenAIError
from stable_openai._manager import lease
from stable_openai._model import ALLOWANCE_PROBES, PROBE_FOR, PROBE_WAIT
from stable_openai._policy import Action, Fate, Verdict
from stable_openai._ring import KeyRing, KeyState, Where, fingerprint, mask, normalize_keys

SECRET = "sk-proj-SECRETSECRET0123456789abcdWXYZ"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def keys(count: int, tag: str = "ring") -> list[str]:
    """Distinctive made-up keys of a real key's length."""
    return [f"sk-{tag}-{index:05d}-MADEUPKEY{index * 7919:010d}" for index in range(count)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def ring_of(clock: FakeClock, count: int) -> tuple[KeyRing, list[str]]:
    names = keys(count)
    return KeyRing(names, clock=clock), names


def pick(ring: KeyRing, avoid: set[KeyState] | None = None) -> str | None:
    state = ring.choose(avoid)
    return None if state is None else state.key


# -- normalize_keys ----------------------------------------------------------------------------


def test_normalize_strips_and_drops_duplicates_keeping_order() -> None:
    a, b, c = keys(3)
    normalized = normalize_keys([f"  {b}\n", a, b, f"\t{c}", a])
    assert [key.key for key in normalized] == [b, a, c]


def test_normalize_accepts_any_iterable_of_str() -> None:
    a, b = keys(2)
    assert [key.key for key in normalize_keys(iter((a, b)))] == [a, b]
    assert [key.key for key in normalize_keys((a,))] == [a]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (SECRET, "single string"),
        (SECRET.encode(), "single string"),
        ({SECRET: 1}, "dict"),
        (42, "int"),
        (None, "NoneType"),
        (["sk-a-valid-key-0000000000", "sk-b-valid-key-0000000000", 7, SECRET], "api_keys[2]"),
        ([SECRET, "sk-b-valid-key-0000000000", SECRET.encode()], "api_keys[2]"),
        (["sk-a-valid-key-0000000000", None], "api_keys[1]"),
    ],
    ids=["str", "bytes", "dict", "int", "None", "int element", "bytes element", "None element"],
)
def test_normalize_type_errors(value: Any, words: str) -> None:
    with pytest.raises(TypeError) as info:
        normalize_keys(value)
    assert words in str(info.value)
    assert SECRET not in str(info.value)
    assert "SECRETSECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], "empty"),
        ([SECRET, ""], "api_keys[1]"),
        ([SECRET, "sk-b-valid-key-0000000000", "   \t"], "api_keys[2]"),
        (["sk-b-valid-key-0000000000", SECRET[:10] + " " + SECRET[10:]], "api_keys[1]"),
        ([SECRET[:10] + "\n" + SECRET[10:]], "api_keys[0]"),
    ],
    ids=["empty list", "empty key", "whitespace-only key", "inner space", "inner newline"],
)
def test_normalize_value_errors(value: Any, words: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_keys(value)
    assert words in str(info.value)
    assert "SECRETSECRET" not in str(info.value)
    assert SECRET[10:] not in str(info.value)


def test_normalize_names_the_argument() -> None:
    with pytest.raises(TypeError, match=r"OPENAI_API_KEYS\[1\]"):
        normalize_keys(["sk-a-valid-key-0000000000", 3], "OPENAI_API_KEYS")


# -- mask and fingerprint --------------------------------------------------------------------


def test_mask_long_key() -> None:
    assert mask("sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ") == "sk-…WXYZ"
    assert mask(SECRET) == "sk-…WXYZ"


@pytest.mark.parametrize("length", range(1, 16))
def test_mask_short_keys_never_reveal_the_key(length: int) -> None:
    key = "abcdefghijklmnopqrstuvwxyz"[:length]
    masked = mask(key)
    assert masked != key
    assert key not in masked
    assert len(masked) < max(length, 2)


def test_fingerprint_is_stable_distinct_and_one_way() -> None:
    a, b = keys(2)
    assert fingerprint(a) == fingerprint(a)
    assert fingerprint(a) != fingerprint(b)
    assert re.fullmatch(r"[0-9a-f]{12}", fingerprint(a))
    assert fingerprint(SECRET) not in SECRET and "SECRET" not in fingerprint(SECRET)


def test_state_repr_and_fields_hide_the_key(clock: FakeClock) -> None:
    ring = KeyRing([SECRET], clock=clock)
    state = ring.find(SECRET)
    assert state is not None
    assert SECRET not in repr(state)
    assert state.masked == mask(SECRET)
    assert state.fingerprint == fingerprint(SECRET)


# -- choosing ----------------------------------------------------------------------------------


def test_round_robin_over_idle_keys(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    order = []
    for _ in range(7):
        state = ring.choose()
        assert state is not None
        order.append(state.key)
        ring.succeed(state)
    assert order == [a, b, c, a, b, c, a]


def test_fewest_in_flight_first(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    sa, sb, sc = ring.choose(), ring.choose(), ring.choose()
    assert [s.key for s in (sa, sb, sc) if s] == [a, b, c]
    again = ring.choose()  # every key has one call in flight: least recently used
    assert again is sa
    assert (sa.in_flight, sb.in_flight, sc.in_flight) == (2, 1, 1)
    ring.release(sc)  # c is now the only idle key
    assert pick(ring) == c
    ring.release(sb)
    assert pick(ring) == b


def test_least_recently_used_among_idle(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    for _ in range(3):
        state = ring.choose()
        assert state is not None
        ring.succeed(state)
    held = ring.choose()  # a, kept in flight
    assert held is not None and held.key == a
    assert pick(ring) == b
    assert pick(ring) == c


def test_counters(clock: FakeClock) -> None:
    ring, (a,) = ring_of(clock, 1)
    state = ring.find(a)
    assert state is not None
    assert (state.calls, state.in_flight) == (0, 0)
    for _ in range(4):
        assert ring.choose() is state
    assert (state.calls, state.in_flight) == (4, 4)
    ring.succeed(state)
    ring.fail(state, rate_limited=True)
    ring.fail(state)
    ring.release(state)
    assert (state.successes, state.rate_limits, state.failures) == (1, 1, 1)
    assert (state.calls, state.in_flight) == (4, 0)
    assert ring.choose() is state
    ring.give_back(state)  # handed out, never called
    assert (state.calls, state.in_flight) == (4, 0)
    ring.release(state)  # one release too many: ignored
    assert state.in_flight == 0


def test_avoid_is_respected(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    sa, sb = ring.find(a), ring.find(b)
    assert sa is not None and sb is not None
    assert pick(ring, {sa}) == b
    assert pick(ring, {sa, sb}) == c
    # a is idle, b and c are busy: avoiding a still picks a busier key
    assert pick(ring, {sa}) in (b, c)
    assert sa.in_flight == 0


def test_avoid_falls_back_when_only_avoided_keys_are_ready(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa, sb = ring.find(a), ring.find(b)
    assert sa is not None and sb is not None
    ring.cool(sb, 30, "rate limited (429)")
    assert ring.choose({sa}) is sa
    assert ring.choose({sa, sb}) is sa
    assert sa.in_flight == 2


def test_empty_ring_chooses_nothing(clock: FakeClock) -> None:
    ring = KeyRing(clock=clock)
    assert len(ring) == 0
    assert ring.choose() is None
    assert ring.next_ready_in() is None


# -- cooling -----------------------------------------------------------------------------------


def test_cooling_key_is_not_handed_out_until_its_deadline(clock: FakeClock) -> None:
    ring, _ = ring_of(clock, 1)
    state = ring.choose()
    assert state is not None
    ring.fail(state, rate_limited=True)
    ring.cool(state, 20, "rate limited (429)")
    assert state.where is Where.COOLING
    assert ring.choose() is None
    clock.advance(19.999)
    assert ring.choose() is None
    clock.advance(0.002)
    assert ring.choose() is state
    assert state.where is Where.READY
    assert state.reason == ""


def test_cooling_key_is_skipped_others_are_used(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.cool(sa, 5, "rate limited (429)")
    for _ in range(5):
        state = ring.choose()
        assert state is not None and state.key == b
        ring.succeed(state)
    clock.advance(5.5)
    assert {pick(ring), pick(ring)} == {a, b}  # both idle again: a is back in the rotation


def test_cool_keeps_the_later_deadline(clock: FakeClock) -> None:
    ring, (a,) = ring_of(clock, 1)
    state = ring.find(a)
    assert state is not None
    ring.cool(state, 30, "no quota")
    ring.cool(state, 5, "rate limited (429)")
    assert ring.next_ready_in() == pytest.approx(30)
    assert state.reason == "no quota"
    clock.advance(10)
    assert ring.choose() is None
    ring.cool(state, 60, "rate limited (429)")  # later than 20 s left: extends
    assert ring.next_ready_in() == pytest.approx(60)
    assert state.reason == "rate limited (429)"
    clock.advance(25)
    assert ring.choose() is None  # the old 30 s deadline passed; the new one holds
    clock.advance(35.5)
    assert ring.choose() is state


def test_next_ready_in(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    assert ring.next_ready_in() is None
    sa, sb, sc = (ring.find(k) for k in (a, b, c))
    assert sa and sb and sc
    ring.cool(sa, 40, "x")
    ring.cool(sb, 10, "x")
    assert ring.next_ready_in() == pytest.approx(10)
    clock.advance(4)
    assert ring.next_ready_in() == pytest.approx(6)
    ring.disable(sb, "revoked (401 invalid_api_key)")  # its heap entry goes stale
    assert ring.next_ready_in() == pytest.approx(36)
    clock.advance(100)
    assert ring.next_ready_in() == 0.0  # due but not yet taken back
    assert pick(ring) == c
    assert pick(ring) == a
    assert ring.next_ready_in() is None


def test_set_cooldown_sets_exactly(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.cool(sa, 100, "no quota")
    ring.set_cooldown(sa, 10)  # shorter is allowed
    assert ring.seconds_left(sa) == pytest.approx(10)
    assert ring.next_ready_in() == pytest.approx(10)
    ring.set_cooldown(sa, 50)  # and longer
    assert ring.seconds_left(sa) == pytest.approx(50)
    ring.set_cooldown(sa, 0)  # ready now
    assert sa.where is Where.READY
    assert ring.seconds_left(sa) == 0.0
    assert ring.next_ready_in() is None
    assert {pick(ring), pick(ring)} == {a, b}
    ring.set_cooldown(sa, 7)  # a ready key too
    assert sa.where is Where.COOLING
    assert ring.seconds_left(sa) == pytest.approx(7)
    ring.set_cooldown(sa, -3)
    assert sa.where is Where.READY


def test_shortened_cooldown_is_honoured_by_choose(clock: FakeClock) -> None:
    ring, (a,) = ring_of(clock, 1)
    state = ring.find(a)
    assert state is not None
    ring.cool(state, 100, "no quota")
    ring.set_cooldown(state, 3)
    clock.advance(3.5)
    assert ring.choose() is state


def test_cooling_an_in_flight_key(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    state = ring.choose()
    assert state is not None and state.key == a
    ring.cool(state, 10, "rate limited (429)")
    ring.fail(state, rate_limited=True)
    assert state.in_flight == 0
    assert pick(ring) == b
    clock.advance(11)
    assert pick(ring) == a  # a has fewer calls in flight than b


def test_seconds_left(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    sa, sb, sc = (ring.find(k) for k in (a, b, c))
    assert sa and sb and sc
    ring.cool(sb, 12, "x")
    ring.disable(sc, "revoked")
    assert ring.seconds_left(sa) == 0.0
    assert ring.seconds_left(sb) == pytest.approx(12)
    assert ring.seconds_left(sc) == math.inf
    clock.advance(20)
    assert ring.seconds_left(sb) == 0.0


# -- disabling ---------------------------------------------------------------------------------


def test_disabled_key_is_never_handed_out(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    assert ring.disable(sa, "revoked (401 invalid_api_key)") is True
    assert ring.disable(sa, "revoked (401 invalid_api_key)") is False
    assert sa.where is Where.DISABLED
    for _ in range(50):
        state = ring.choose()
        assert state is not None and state.key == b
        ring.succeed(state)
        clock.advance(3600)
    ring.cool(sa, 1, "x")  # cooling a disabled key does not revive it
    ring.set_cooldown(sa, 0)
    clock.advance(2)
    assert sa.where is Where.DISABLED
    sb = ring.find(b)
    assert sb is not None
    ring.disable(sb, "revoked")
    assert ring.choose() is None
    assert ring.next_ready_in() is None


def test_disabling_a_cooling_key(clock: FakeClock) -> None:
    ring, (a,) = ring_of(clock, 1)
    state = ring.find(a)
    assert state is not None
    ring.cool(state, 5, "x")
    assert ring.disable(state, "revoked") is True
    clock.advance(10)
    assert ring.choose() is None


def test_add_reenables_a_disabled_key(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.disable(sa, "revoked")
    assert ring.add([a]) == []  # not new
    assert sa.where is Where.READY
    assert sa.reason == ""
    assert {pick(ring), pick(ring)} == {a, b}


def test_add_returns_only_new_states_and_leaves_cooling_keys_cooling(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.cool(sa, 30, "x")
    (c,) = keys(1, "extra")
    added = ring.add([a, b, c])
    assert [s.key for s in added] == [c]
    assert sa.where is Where.COOLING
    assert len(ring) == 3


def test_disabled_key_in_flight_releases_cleanly(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    state = ring.choose()
    assert state is not None
    ring.disable(state, "revoked")
    ring.fail(state)
    assert state.in_flight == 0
    ring.add([state.key])
    assert state.where is Where.READY
    assert {pick(ring), pick(ring)} == {a, b}


# -- reconfiguring and removing ------------------------------------------------------------------


def test_reconfigure_keeps_state_of_kept_keys(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    (d,) = keys(1, "new")
    sa, sb, sc = (ring.find(k) for k in (a, b, c))
    assert sa and sb and sc
    assert ring.choose() is sa
    ring.succeed(sa)
    ring.cool(sb, 30, "rate limited (429)")
    ring.reconfigure([d, b, a])
    assert [s.key for s in ring] == [d, b, a]
    assert ring.find(a) is sa and ring.find(b) is sb
    assert (sa.calls, sa.successes) == (1, 1)
    assert sb.where is Where.COOLING
    assert ring.seconds_left(sb) == pytest.approx(30)
    assert ring.find(c) is None
    assert sc.where is Where.REMOVED
    sd = ring.find(d)
    assert sd is not None and sd.where is Where.READY
    chosen = Counter()
    for _ in range(20):
        state = ring.choose()
        assert state is not None
        chosen[state.key] += 1
        ring.succeed(state)
    assert set(chosen) == {a, d}


def test_reconfigure_reenables_a_disabled_kept_key(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.disable(sa, "revoked")
    ring.reconfigure([a, b])
    assert sa.where is Where.READY


def test_key_removed_while_in_flight_releases_without_error(clock: FakeClock) -> None:
    ring, (_a, b, c) = ring_of(clock, 3)
    held = [ring.choose() for _ in range(3)]
    assert all(held)
    sa = held[0]
    assert sa is not None
    ring.reconfigure([b, c])
    ring.succeed(sa)
    assert sa.in_flight == 0 and sa.where is Where.REMOVED
    for state in held[1:]:
        assert state is not None
        ring.fail(state)
    assert ring.remove(b) is True
    assert ring.remove(b) is False
    assert [pick(ring) for _ in range(3)] == [c, c, c]


def test_removed_cooling_key_does_not_come_back(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa = ring.find(a)
    assert sa is not None
    ring.cool(sa, 5, "x")
    ring.remove(a)
    assert ring.next_ready_in() is None
    clock.advance(10)
    assert [pick(ring) for _ in range(3)] == [b, b, b]
    ring.cool(sa, 5, "x")  # no effect on a removed key
    assert ring.next_ready_in() is None


def test_release_after_forget_in_flight_does_not_go_negative(clock: FakeClock) -> None:
    ring, (a, b) = ring_of(clock, 2)
    sa, sb = ring.find(a), ring.find(b)
    assert sa is not None and sb is not None
    held = [ring.choose() for _ in range(4)]  # a, b, a, b
    ring.cool(sb, 10, "x")
    ring.forget_in_flight()  # as in a forked child
    assert (sa.in_flight, sb.in_flight) == (0, 0)
    for state in held:
        assert state is not None
        ring.succeed(state)
    assert (sa.in_flight, sb.in_flight) == (0, 0)
    assert ring.choose() is sa
    assert sa.in_flight == 1
    clock.advance(11)
    assert ring.choose() is sb  # fewer in flight than a
    assert sb.in_flight == 1


# -- reasons ---------------------------------------------------------------------------------


def test_reasons(clock: FakeClock) -> None:
    ring, names = ring_of(clock, 5)
    states = [ring.find(k) for k in names]
    assert all(states)
    s0, s1, s2, s3, _s4 = states
    assert s0 and s1 and s2 and s3
    ring.cool(s0, 10, "rate limited (429)")
    ring.cool(s1, 10, "rate limited (429)")
    ring.cool(s2, 10, "no quota (429 insufficient_quota)")
    ring.disable(s3, "revoked (401 invalid_api_key)")
    assert ring.reasons(Where.COOLING) == Counter(
        {"rate limited (429)": 2, "no quota (429 insufficient_quota)": 1}
    )
    assert ring.reasons(Where.DISABLED) == Counter({"revoked (401 invalid_api_key)": 1})
    assert ring.reasons(Where.READY) == Counter({"ready": 1})


def test_all_usable_forbidden(clock: FakeClock) -> None:
    ring, (a, b, c) = ring_of(clock, 3)
    sa, sb, sc = (ring.find(k) for k in (a, b, c))
    assert sa and sb and sc
    assert ring.all_usable_forbidden() is False
    ring.cool(sa, 600, "forbidden (403)", forbidden=True)
    ring.cool(sb, 600, "forbidden (403)", forbidden=True)
    assert ring.all_usable_forbidden() is False  # c is ready
    ring.disable(sc, "revoked")
    assert ring.all_usable_forbidden() is True  # disabled keys do not count
    ring.cool(sb, 900, "rate limited (429)")  # a longer, non-403 cooldown takes over
    assert ring.all_usable_forbidden() is False
    ring.disable(sb, "revoked")
    ring.disable(sa, "revoked")
    assert ring.all_usable_forbidden() is False  # nothing usable at all


# -- scale -------------------------------------------------------------------------------------


def test_ten_thousand_keys_round_robin_evenly(clock: FakeClock) -> None:
    names = keys(10_000, "many")
    ring = KeyRing(names, clock=clock)
    chosen: Counter[str] = Counter()
    first_pass = []
    for index in range(20_000):
        state = ring.choose()
        assert state is not None
        chosen[state.key] += 1
        if index < 10_000:
            first_pass.append(state.key)
        ring.succeed(state)
    assert first_pass == names
    assert set(chosen.values()) == {2}
    assert len(chosen) == 10_000


# -- KeyManager ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_manager() -> Iterator[None]:
    KeyManager.reset()
    yield
    KeyManager.reset()


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_manager_is_a_singleton(clock: FakeClock) -> None:
    names = keys(3, "km")
    manager = KeyManager(names, clock=clock)
    assert KeyManager() is manager
    assert KeyManager.current() is manager
    assert len(manager) == 3
    assert list(manager.data) == names


def test_manager_reconfigures_when_given_new_keys(clock: FakeClock) -> None:
    a, b, c = keys(3, "km")
    (d,) = keys(1, "km2")
    manager = KeyManager([a, b, c], clock=clock)
    assert manager.set_ttl(b, 30) is True
    again = KeyManager([d, b, a])
    assert again is manager
    assert list(manager.data) == [d, b, a]
    assert manager.data[b] == pytest.approx(30)
    assert manager.data[d] == 0.0


def test_manager_reads_openai_api_keys(monkeypatch: pytest.MonkeyPatch, no_env: None) -> None:
    a, b, c = keys(3, "env")
    monkeypatch.setenv("OPENAI_API_KEYS", f" {a},{b}\n {c} ,, {a}")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-single-env-key-000000000000")
    assert list(KeyManager().data) == [a, b, c]


def test_manager_falls_back_to_openai_api_key(
    monkeypatch: pytest.MonkeyPatch, no_env: None
) -> None:
    (a,) = keys(1, "env")
    monkeypatch.setenv("OPENAI_API_KEYS", "  , ")
    monkeypatch.setenv("OPENAI_API_KEY", a)
    assert list(KeyManager().data) == [a]


def test_manager_without_keys_says_how_to_configure(no_env: None) -> None:
    with pytest.raises(NoKeysError) as info:
        KeyManager()
    message = str(info.value)
    assert "KeyManager([" in message
    assert "OPENAI_API_KEYS" in message and "OPENAI_API_KEY" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, StableOpenAIError)
    assert KeyManager.current() is None


def test_manager_rejects_bad_keys_without_echoing_them(no_env: None) -> None:
    with pytest.raises(ValueError) as info:
        KeyManager(["sk-valid-key-000000000000000", SECRET[:10] + " " + SECRET[10:]])
    assert "api_keys[1]" in str(info.value)
    assert "SECRETSECRET" not in str(info.value)
    assert KeyManager.current() is None


def test_manager_built_from_sixteen_threads_is_one_instance(clock: FakeClock) -> None:
    names = keys(4, "threads")
    barrier = threading.Barrier(16)
    made: list[KeyManager] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            barrier.wait(timeout=5)
            made.append(KeyManager(names, clock=clock))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, daemon=True) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert not errors
    assert len(made) == 16
    assert len({id(m) for m in made}) == 1
    assert made[0] is KeyManager()
    assert len(made[0]) == 4


def test_get_key_rotates(clock: FakeClock) -> None:
    names = keys(3, "km")
    manager = KeyManager(names, clock=clock)
    assert [manager.get_key() for _ in range(7)] == [*names, *names, names[0]]
    assert all(row["in_flight"] == 0 and row["calls"] == 0 for row in manager.stats())


def test_set_ttl_data_get_min_ttl(clock: FakeClock) -> None:
    a, b, c = keys(3, "km")
    manager = KeyManager([a, b, c], clock=clock)
    assert manager.get_min_ttl() == 0.0
    assert manager.data == {a: 0.0, b: 0.0, c: 0.0}
    assert manager.set_ttl(a, 30) is True
    assert manager.set_ttl(b, 10.5) is True
    assert manager.set_ttl(f"  {c}  ", 20) is True  # stripped like at configuration
    assert manager.get_min_ttl() == pytest.approx(10.5)
    clock.advance(4)
    assert manager.data == pytest.approx({a: 26.0, b: 6.5, c: 16.0})
    assert manager.get_min_ttl() == pytest.approx(6.5)
    assert manager.set_ttl(a, 1) is True  # shorter is allowed
    assert manager.get_min_ttl() == pytest.approx(1)
    assert manager.set_ttl(a, 0) is True
    assert manager.data[a] == 0.0
    assert manager.get_min_ttl() == 0.0
    assert manager.get_key() == a
    assert manager.set_ttl("sk-unknown-key-00000000000000", 5) is False


def test_set_ttl_rejects_bad_arguments(clock: FakeClock) -> None:
    (a,) = keys(1, "km")
    manager = KeyManager([a], clock=clock)
    for ttl in ("5", None, float("nan"), True):
        with pytest.raises(TypeError):
            manager.set_ttl(a, ttl)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        manager.set_ttl(123, 5)  # type: ignore[arg-type]


def test_data_is_inf_for_disabled_keys_and_get_min_ttl(clock: FakeClock) -> None:
    a, b = keys(2, "km")
    manager = KeyManager([a, b], clock=clock)
    revoked = Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (401)")
    for _ in range(2):
        state, _waited = manager._acquire(None, 0.0)
        manager._fail(state, revoked)
    assert manager.data == {a: math.inf, b: math.inf}
    assert manager.get_min_ttl() == math.inf


def test_delete_key(clock: FakeClock) -> None:
    a, b = keys(2, "km")
    manager = KeyManager([a, b], clock=clock)
    assert manager.delete_key(a) is True
    assert manager.delete_key(a) is False
    assert manager.delete_key("sk-unknown-key-00000000000000") is False
    assert list(manager.data) == [b]
    assert [manager.get_key() for _ in range(3)] == [b, b, b]
    assert manager.delete_key(b) is True
    assert manager.get_min_ttl() == 0.0
    with pytest.raises(NoKeysError):
        manager._acquire(None, 0.0)


def test_add_keys_returns_number_of_new_keys(clock: FakeClock) -> None:
    a, b, c = keys(3, "km")
    manager = KeyManager([a], clock=clock)
    assert manager.add_keys([a, b, f" {c} ", b]) == 2
    assert manager.add_keys([a]) == 0
    assert list(manager.data) == [a, b, c]
    with pytest.raises(TypeError):
        manager.add_keys(a)


def test_add_keys_reenables_a_disabled_key(clock: FakeClock) -> None:
    (a,) = keys(1, "km")
    manager = KeyManager([a], clock=clock)
    state, _ = manager._acquire(None, 0.0)
    manager._fail(state, Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked"))
    assert manager.add_keys([a]) == 0
    assert manager.data == {a: 0.0}
    assert manager.get_key() == a


def test_stats_rows(clock: FakeClock) -> None:
    a, b, c = keys(3, "km")
    manager = KeyManager([a, b, c], clock=clock)
    first, _ = lease(manager, None, 0.0)
    first.succeed()
    second, _ = lease(manager, None, 0.0)
    second.fail(Verdict(Fate.COOL, Action.RETRY_ELSEWHERE, 12.0, "rate limited (429)", True))
    third, _ = lease(manager, None, 0.0)
    third.fail(Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (401)"))
    busy, _ = lease(manager, None, 0.0)  # a again, left in flight
    rows = manager.stats()
    assert [row["key"] for row in rows] == [mask(a), mask(b), mask(c)]
    assert [row["fingerprint"] for row in rows] == [fingerprint(k) for k in (a, b, c)]
    ra, rb, rc = rows
    assert ra == {
        "key": mask(a), "fingerprint": fingerprint(a), "pool": f"own ({mask(a)})",
        "state": "ready", "seconds_left": 0.0,
        "reason": "", "calls": 2, "successes": 1, "rate_limits": 0, "failures": 0,
        "in_flight": 1,
    }
    assert (rb["state"], rb["reason"], rb["rate_limits"], rb["failures"]) == (
        "cooling", "rate limited (429)", 1, 0,
    )
    assert rb["seconds_left"] == pytest.approx(12.0)
    assert (rc["state"], rc["reason"], rc["failures"], rc["seconds_left"]) == (
        "disabled", "revoked (401)", 1, math.inf,
    )
    busy.abandon()
    assert manager.stats()[0]["in_flight"] == 0
    text = repr(rows)
    for key in (a, b, c):
        assert key not in text


def test_repr_contains_no_key(clock: FakeClock) -> None:
    names = [SECRET, *keys(2, "km")]
    manager = KeyManager(names, clock=clock)
    manager.set_ttl(names[1], 5)
    text = repr(KeyManager())
    assert "3 keys" in text
    assert "1 cooling" in text
    for key in names:
        assert key not in text
    assert "SECRETSECRET" not in text


def test_acquire_raises_all_cooling_beyond_the_budget(clock: FakeClock) -> None:
    a, b = keys(2, "km")
    manager = KeyManager([a, b], clock=clock)
    manager.set_ttl(a, 50)
    manager.set_ttl(b, 30)
    clock.advance(5)
    with pytest.raises(AllKeysCoolingError) as info:
        manager._acquire(None, 10.0)
    assert info.value.retry_after == pytest.approx(25.0, abs=0.5)
    assert info.value.reasons == {"set_ttl": 2}
    assert "2 usable API key(s)" in str(info.value)
    for key in (a, b):
        assert key not in str(info.value)


def test_acquire_raises_all_disabled(clock: FakeClock) -> None:
    a, b = keys(2, "km")
    manager = KeyManager([a, b], clock=clock)
    reason = "revoked (401 invalid_api_key)"
    for _ in range(2):
        state, _ = manager._acquire(None, 0.0)
        manager._fail(state, Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason=reason))
    with pytest.raises(AllKeysDisabledError) as info:
        manager._acquire(None, math.inf)
    message = str(info.value)
    assert "all 2 API key(s) are disabled" in message
    assert reason in message
    assert info.value.reasons == {reason: 2}
    for key in (a, b):
        assert key not in message


def wait_then_wake(
    manager: KeyManager, key: str, monkeypatch: pytest.MonkeyPatch, take: Any
) -> tuple[list[Any], list[BaseException]]:
    """Run ``take()`` in a thread until it waits on the manager's condition, then make ``key``
    ready with ``set_ttl(key, 0)``; return what ``take()`` returned and what it raised."""
    del monkeypatch  # the queue shows when the caller waits; nothing needs patching

    def queued() -> bool:
        # A caller joins the queue and starts waiting in one hold of the lock, so once it is
        # queued, set_ttl (which takes the lock) cannot overtake its wait.
        return bool(manager._turns)

    got: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            got.append(take())
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not queued() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert queued()
    assert manager.set_ttl(key, 0) is True
    thread.join(timeout=5)
    assert not thread.is_alive()
    return got, errors


def test_waiting_acquire_is_woken_by_set_ttl(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a,) = keys(1, "km")
    manager = KeyManager([a], clock=clock)
    manager.set_ttl(a, 3600)  # on the fake clock: nothing but a notify can end the wait
    got, errors = wait_then_wake(
        manager, a, monkeypatch, lambda: manager._acquire(None, math.inf)[0]
    )
    assert errors == []
    assert [s.key for s in got] == [a]


@pytest.mark.parametrize("ttl", [math.inf, 1e10], ids=["inf", "1e10"])
def test_get_key_waits_for_a_key_benched_for_very_long(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, ttl: float
) -> None:
    """``get_key()`` waits without limit; a cooldown longer than ``threading.TIMEOUT_MAX``
    (``set_ttl(key, math.inf)``, or ``quota_cooldown=math.inf``) must not crash the wait."""
    (a,) = keys(1, "km")
    manager = KeyManager([a], clock=clock)
    manager.set_ttl(a, ttl)
    assert manager.data[a] == ttl
    got, errors = wait_then_wake(manager, a, monkeypatch, manager.get_key)
    assert errors == []
    assert got == [a]


def test_a_revoked_key_is_logged_once_masked(
    clock: FakeClock, mocker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    manager = KeyManager([SECRET, *keys(1, "km")], clock=clock)
    spy = mocker.spy(_manager.logger, "warning")
    revoked = Verdict(
        Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (401 invalid_api_key)"
    )
    target = manager._ring.find(SECRET)
    assert target is not None
    # two calls in flight on the same key, both answered 401
    first, _ = manager._acquire(None, 0.0)
    manager._acquire(None, 0.0)
    second, _ = manager._acquire(None, 0.0)
    assert first is target and second is target
    with caplog.at_level(logging.DEBUG, logger="stable_openai"):
        manager._fail(first, revoked)
        manager._fail(second, revoked)
    assert spy.call_count == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    record = warnings[0]
    assert record.name == "stable_openai"
    text = record.getMessage()
    assert mask(SECRET) in text
    assert SECRET not in text
    assert "SECRETSECRET" not in text
    assert "revoked (401 invalid_api_key)" in text
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert manager.data[SECRET] == math.inf


# -- causes ---------------------------------------------------------------------------------------
def test_an_answer_with_budget_left_frees_keys_held_for_a_spent_budget_by_cause_not_text(
    clock: FakeClock,
) -> None:
    ring, names = ring_of(clock, 3)
    spent, limited, worded = (ring.find(name) for name in names)
    assert spent is not None and limited is not None and worded is not None
    pool = spent.pool
    for state in (limited, worded):
        ring.join_pool(state, pool.name)
    ring.cool(spent, 30.0, "budget spent (RPM)", Cause.REQUESTS_SPENT)
    ring.cool(limited, 30.0, "rate limited (429)", Cause.RATE_LIMITED)
    # The words of a spent budget on a key cooled for another cause: the words do not count.
    ring.cool(worded, 30.0, "budget spent (RPM)", Cause.SET_BY_USER)
    answer = ServerBudget(requests_limit=10, requests_left=5, requests_reset=1.0)
    taken = ring.find(names[0])
    assert taken is not None
    assert ring.learn(taken, answer)  # keys became ready
    assert (spent.where, spent.cause, spent.reason) == (Where.READY, None, "")
    assert (limited.where, limited.cause) == (Where.COOLING, Cause.RATE_LIMITED)
    assert (worded.where, worded.cause) == (Where.COOLING, Cause.SET_BY_USER)


def test_each_way_of_holding_a_key_records_its_cause(clock: FakeClock) -> None:
    ring, names = ring_of(clock, 3)
    a, b, c = (ring.find(name) for name in names)
    assert a is not None and b is not None and c is not None
    ring.set_cooldown(a, 5.0)
    assert a.cause is Cause.SET_BY_USER
    ring.disable(b, "revoked (401 invalid_api_key)", Cause.REVOKED)
    assert (b.where, b.cause) == (Where.DISABLED, Cause.REVOKED)
    ring.cool(c, 1.0, "forbidden (403)", Cause.FORBIDDEN, forbidden=True)
    clock.advance(1.5)
    assert ring.choose() is c  # its cooldown is over: ready, and its cause is gone
    assert (c.cause, c.reason, c.forbidden) == (None, "", False)
    ring.add([b.spec])  # given again: enabled
    assert (b.where, b.cause) == (Where.READY, None)


def test_writes_to_data_take_effect_as_in_0_1_1() -> None:
    """0.1.1's ``data`` was its live dict: ``data[key] = ttl`` cooled a key (or added one),
    ``del data[key]`` removed it.  Here they do the same, and say what was wrong otherwise."""
    from wire import made_up_keys

    a, b, c = made_up_keys(3, "data")
    manager = KeyManager([a, b])
    data = manager.data
    data[a] = 30
    assert manager.data[a] == pytest.approx(30, abs=1)
    assert data[a] == 30.0
    data[c] = 0  # a new key, as 0.1.1's dict took it
    assert sorted(manager.data) == sorted([a, b, c])
    del data[b]
    assert sorted(manager.data) == sorted([a, c]) and b not in data
    with pytest.raises(TypeError, match="ttl must be a number"):
        data[b] = "soon"  # type: ignore[assignment]
    assert b not in manager.data  # a bad write adds nothing
    for missing in (lambda: data[b], lambda: data.__delitem__(b)):
        with pytest.raises(KeyError) as info:
            missing()
        assert b not in str(info.value) and b[-4:] in str(info.value)  # masked, never whole
    assert a not in repr(data) and a[-4:] in repr(data)


def test_a_held_models_pace_spends_one_call_a_slot_and_keeps_the_lower_rate(
    clock: FakeClock,
) -> None:
    (a,) = keys(1, "lanes")
    ring = KeyRing([a], clock=clock)
    state = ring.find(a)
    assert state is not None
    assert ring.lane_pass(state, "gpt-4o") == 0.0  # nothing known: no hold, no pace
    assert not state.pool.lanes
    ring.hold_lane(state, "gpt-4o", 1.0)
    ring.pace_lane(state, "gpt-4o", 2.0, after=1.0)  # 2 calls a second, from 1 s on
    ring.pace_lane(state, "gpt-4o", 4.0, after=1.0)  # a higher rate does not replace it
    assert ring.lane_pass(state, "gpt-4o") == pytest.approx(1.0)  # held
    assert ring.lane_pass(state, "gpt-4o-mini") == 0.0  # the other model is not
    clock.advance(1.0)
    assert ring.lane_pass(state, "gpt-4o") == 0.0  # one call goes ...
    assert ring.lane_pass(state, "gpt-4o") == pytest.approx(0.5)  # ... the next in 1/2 s
    clock.advance(0.5)
    assert ring.lane_pass(state, "gpt-4o") == 0.0
    ring.lane_succeeded(state, "gpt-4o")
    assert state.pool.lane_paces["gpt-4o"][0] == pytest.approx(2.0 * 1.0005)


def test_a_model_held_in_one_pool_goes_one_call_at_a_time_in_pools_that_have_not_learned_it(
    clock: FakeClock,
) -> None:
    """Once a 429 of gpt-4o held it in one pool, another pool that has not learned gpt-4o's limit
    (no pace for it; or, serving only gpt-4o, no 429 nor headers yet) lets one gpt-4o call
    go per PROBE_WAIT (its limit there may be as low: a call at a time meets one 429, not a
    volley), ALLOWANCE_PROBES calls at most, for PROBE_FOR seconds after the last 429 of
    gpt-4o; other models, and a pool that learned gpt-4o's limit, are not held."""
    a, b, c, d = keys(4, "probe")
    ring = KeyRing([a, b, c, d], clock=clock)
    first, second, fresh, learned = (ring.find(key) for key in (a, b, c, d))
    assert first is not None and second is not None
    assert fresh is not None and learned is not None
    assert ring.lane_pass(second, "gpt-4o") == 0.0  # no 429 anywhere: nothing held
    assert ring.lane_pass(second, "gpt-4o") == 0.0
    fresh.pool.admit("gpt-4o")  # pools whose calls all asked for gpt-4o: paced by their
    learned.pool.admit("gpt-4o")  # budget, once a 429 (or headers) told it
    learned.pool.limited(clock(), 0, 2.0, 0.5, model="gpt-4o")
    ring.limit_met("gpt-4o")  # a 429 of gpt-4o (as KeyManager's _fail tells the ring) ...
    ring.hold_lane(first, "gpt-4o", 30.0)  # ... held it in the first pool
    for state in (second, fresh):
        assert ring.lane_pass(state, "gpt-4o") == 0.0  # one goes ...
        assert ring.lane_pass(state, "gpt-4o") == pytest.approx(PROBE_WAIT)  # ... then held
    assert ring.lane_pass(second, "gpt-4o-mini") == 0.0
    assert ring.lane_pass(learned, "gpt-4o") == 0.0
    assert ring.lane_pass(learned, "gpt-4o") == 0.0
    for _ in range(ALLOWANCE_PROBES - 1):
        clock.advance(PROBE_WAIT)
        assert ring.lane_pass(second, "gpt-4o") == 0.0
    clock.advance(PROBE_WAIT)
    assert ring.lane_pass(second, "gpt-4o") == 0.0  # its limit is above that: unheld again
    assert ring.lane_pass(second, "gpt-4o") == 0.0
    clock.advance(PROBE_FOR)  # no 429 of gpt-4o for that long: the others go unheld too
    assert ring.lane_pass(fresh, "gpt-4o") == 0.0
    assert ring.lane_pass(fresh, "gpt-4o") == 0.0
    ring.limit_met("gpt-4o")  # ... until the next
    assert ring.lane_pass(fresh, "gpt-4o") == 0.0
    assert ring.lane_pass(fresh, "gpt-4o") == pytest.approx(PROBE_WAIT)
    ring.pace_lane(first, "gpt-4o", 100.0, after=0.0)  # a pool that learned its pace
    clock.advance(30.0)  # (once its 429's hold is over)
    ring.limit_met("gpt-4o")
    assert ring.lane_pass(first, "gpt-4o") == 0.0
    assert ring.lane_pass(first, "gpt-4o") == pytest.approx(0.01)  # is paced by it, no more
