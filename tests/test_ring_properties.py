"""Stateful property tests of the key ring (``KeyRing``) on a fake clock.

Hypothesis drives a ring through random sequences of everything that can happen to it —
choosing (with and without keys to avoid), ending calls every way, cooling keys and pools,
setting cooldowns, disabling, adding, reconfiguring and removing keys, spending and learning
budgets, and time passing — and checks after every step that the ring's structure and
counters agree with a model kept beside it.  Pure: no threads, no I/O, no sleeping.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from stable_openai._budget import ServerBudget
from stable_openai._keys import Key
from stable_openai._ring import KeyRing, KeyState, Marks, Where

KEYS = [f"sk-prop-{index:02d}-MADEUPKEY{index * 7919:010d}" for index in range(4)]

SECONDS = st.sampled_from([-1.0, 0.0, 0.001, 0.5, 1.0, 2.5, 20.0, 600.0, math.inf])
ADVANCE = st.sampled_from([0.0, 0.001, 0.01, 0.5, 1.0, 3.0, 30.0, 700.0, 4000.0])
REASONS = st.sampled_from(["rate limited (429)", "budget spent (RPM)", "forbidden (403 x)", "x"])

SPECS = st.builds(
    Key,
    st.sampled_from(KEYS),
    pool=st.sampled_from([None, None, "P1", "P1", "P1", "P2", "org-a"]),
    weight=st.sampled_from([1.0, 1.0, 1.0, 0.5, 2.0, 3.0]),
    rpm=st.sampled_from([None, None, None, 1, 60, 600]),
    tpm=st.sampled_from([None, None, None, 100, 6000]),
)

COUNTS = st.one_of(st.none(), st.integers(min_value=0, max_value=20))
RESETS = st.one_of(st.none(), st.sampled_from([0.0, 0.012, 0.5, 1.0, 20.0, 360.0, 7200.0]))
BUDGETS = st.builds(
    ServerBudget,
    requests_limit=COUNTS,
    requests_left=COUNTS,
    requests_reset=RESETS,
    tokens_limit=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
    tokens_left=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
    tokens_reset=RESETS,
    organization=st.sampled_from([None, None, "org-a", "org-b", "P1"]),
    project=st.sampled_from([None, None, "proj-1"]),
)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Model:
    """What the rules applied to one key state say its counters must be."""

    choices: int = 0
    releases: int = 0
    calls: int = 0
    successes: int = 0
    rate_limits: int = 0
    failures: int = 0


Snapshot = dict[KeyState, tuple[Where, float, str]]


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.ring = KeyRing(clock=self.clock)
        self.handles: list[KeyState] = []  # one entry per choice not yet ended
        self.model: dict[KeyState, Model] = {}
        self.removed: list[KeyState] = []
        self.marks: list[Marks] = []  # what sent() returned, for learn

    # -- helpers ---------------------------------------------------------------------------
    def _register(self) -> None:
        for state in self.ring:
            self.model.setdefault(state, Model())

    def _known(self) -> list[KeyState]:
        """Every state ever made: those in the ring and those removed from it."""
        return list(self.model)

    def _snap(self) -> Snapshot:
        return {state: (state.where, state.cool_until, state.reason) for state in self.model}

    def _transitions(
        self,
        before: Snapshot,
        lowered: frozenset[KeyState] = frozenset(),
        reenabled: frozenset[str] = frozenset(),
    ) -> None:
        """Deadlines only move later (but for ``lowered``), disabled keys come back only
        when given again (``reenabled``), removed keys never come back."""
        now = self.clock()
        for state, (where, deadline, _) in before.items():
            after = state.where
            if where is Where.COOLING and state not in lowered:
                if after is Where.COOLING:
                    assert state.cool_until >= deadline, (state, deadline, state.cool_until)
                elif after is Where.READY:
                    assert deadline <= now, f"{state!r} made ready {deadline - now}s early"
            elif where is Where.DISABLED:
                assert after in (Where.DISABLED, Where.REMOVED) or (
                    after is Where.READY and state.key in reenabled
                ), f"{state!r} left DISABLED for {after}"
            elif where is Where.REMOVED:
                assert after is Where.REMOVED

    def _eligible(self) -> list[KeyState]:
        now = self.clock()
        return [
            s for s in self.ring
            if s.where is Where.READY or (s.where is Where.COOLING and s.cool_until <= now)
        ]

    def _any_state(self, data: st.DataObject) -> KeyState:
        return data.draw(st.sampled_from(self._known()))

    # -- building --------------------------------------------------------------------------
    @initialize(specs=st.lists(SPECS, min_size=2, max_size=5), shared=st.booleans())
    def build(self, specs: list[Key], shared: bool) -> None:
        if shared:  # two keys that share one budget, the case where pools matter most
            specs = [dataclasses.replace(specs[0], pool="P1"),
                     Key(next(k for k in KEYS if k != specs[0].key), pool="P1"), *specs[1:]]
        self.ring = KeyRing(specs, clock=self.clock)
        self._register()
        assert {s.key for s in self.ring} == {spec.key for spec in specs}

    @rule(specs=st.lists(SPECS, max_size=3))
    def add(self, specs: list[Key]) -> None:
        before = self._snap()
        present = {s.key for s in self.ring}
        added = self.ring.add(specs)
        self._register()
        assert {s.key for s in added} == {spec.key for spec in specs} - present
        self._transitions(before, reenabled=frozenset(spec.key for spec in specs))
        for spec in specs:
            state = self.ring.find(spec.key)
            assert state is not None and state.where is not Where.DISABLED

    @rule(specs=st.lists(SPECS, max_size=4))
    def reconfigure(self, specs: list[Key]) -> None:
        before = self._snap()
        old = {s.key: s for s in self.ring}
        if not specs:
            with pytest.raises(ValueError, match="empty"):
                self.ring.reconfigure(specs)
            assert {s.key: s for s in self.ring} == old  # nothing changed
            self._transitions(before)
            return
        self.ring.reconfigure(specs)
        self._register()
        keep = {spec.key for spec in specs}
        assert [s.key for s in self.ring] == list(dict.fromkeys(spec.key for spec in specs))
        for key, state in old.items():
            if key in keep:
                assert self.ring.find(key) is state  # present keys keep their state
            else:
                assert state.where is Where.REMOVED
                self.removed.append(state)
        self._transitions(before, reenabled=frozenset(keep))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        # Mostly a key with calls in flight, whose calls end after it left; else any key.
        busy = sorted({s.key for s in self.handles if s.where is not Where.REMOVED})
        in_ring = [s.key for s in self.ring]
        choice = data.draw(st.sampled_from(["busy", "busy", "in ring", "any"]))
        if choice == "busy" and busy:
            key = data.draw(st.sampled_from(busy))
        elif choice != "any" and in_ring:
            key = data.draw(st.sampled_from(in_ring))
        else:
            key = data.draw(st.sampled_from(KEYS))
        before = self._snap()
        state = self.ring.find(key)
        assert self.ring.remove(key) is (state is not None)
        assert self.ring.find(key) is None
        if state is not None:
            assert state.where is Where.REMOVED
            self.removed.append(state)
        self._transitions(before)

    # -- calls -----------------------------------------------------------------------------
    @rule(data=st.data())
    def choose_again(self, data: st.DataObject) -> None:
        """Choosing is what calls do most: a second rule makes it as common as the rest."""
        self.choose(data, use_avoid=False)

    @rule(data=st.data(), use_avoid=st.booleans())
    def choose(self, data: st.DataObject, use_avoid: bool) -> None:
        states = list(self.ring)
        avoid: set[KeyState] | None = None
        if use_avoid and states:
            avoid = set(data.draw(st.lists(st.sampled_from(states), max_size=len(states))))
        eligible = self._eligible()
        levels = {s: s.level for s in eligible}
        before = self._snap()
        got = self.ring.choose(avoid)
        if got is None:
            assert not eligible, f"no key handed out though {eligible} were ready"
        else:
            assert got in levels, (
                f"{got!r} handed out while {before[got][0].value} "
                f"until {before[got][1]} (now {self.clock()})"
            )
            preferred = [s for s in eligible if not avoid or s not in avoid] or eligible
            assert got in preferred, "an avoided key was handed out while another was ready"
            assert levels[got] == min(levels[s] for s in preferred), "not the least loaded"
            self.handles.append(got)
            self.model[got].choices += 1
            self.model[got].calls += 1
        self._transitions(before)

    @precondition(lambda self: self.handles)
    @rule(
        data=st.data(),
        how=st.sampled_from(["release", "succeed", "fail", "fail rate-limited", "give back"]),
        tokens=st.sampled_from([0.0, 0.0, 1.0, 17.0, 250.0, 5000.0, 1e6, -40.0]),
    )
    def end_call(self, data: st.DataObject, how: str, tokens: float) -> None:
        orphans = [i for i, s in enumerate(self.handles) if s.where is Where.REMOVED]
        if orphans and data.draw(st.booleans()):  # often a call whose key has left the ring
            index = data.draw(st.sampled_from(orphans))
        else:
            index = data.draw(st.integers(min_value=0, max_value=len(self.handles) - 1))
        state = self.handles.pop(index)
        model = self.model[state]
        before = self._snap()
        if how == "release":
            self.ring.end(state, tokens)
        elif how == "succeed":
            self.ring.succeed(state, tokens)
            model.successes += 1
        elif how == "fail":
            self.ring.fail(state, tokens=tokens)
            model.failures += 1
        elif how == "fail rate-limited":
            self.ring.fail(state, rate_limited=True, tokens=tokens)
            model.rate_limits += 1
        else:
            self.ring.give_back(state)
            model.calls -= 1
        model.releases += 1
        self._transitions(before)

    # -- cooling and disabling ---------------------------------------------------------------
    @precondition(lambda self: self.model)
    @rule(data=st.data(), seconds=SECONDS, reason=REASONS, forbidden=st.booleans())
    def cool(self, data: st.DataObject, seconds: float, reason: str, forbidden: bool) -> None:
        state = self._any_state(data)
        before = self._snap()
        where = state.where
        self.ring.cool(state, seconds, reason, forbidden=forbidden)
        if where in (Where.DISABLED, Where.REMOVED):
            assert state.where is where  # cooling never revives a key
        else:
            assert state.where is Where.COOLING
            assert state.cool_until >= self.clock() + max(0.0, seconds)
        self._transitions(before)

    @precondition(lambda self: self.ring.pools())
    @rule(data=st.data(), seconds=SECONDS, reason=REASONS)
    def cool_pool(self, data: st.DataObject, seconds: float, reason: str) -> None:
        pool = data.draw(st.sampled_from(self.ring.pools()))
        before = self._snap()
        self.ring.cool_pool(pool, seconds, reason)
        for member in pool.members:
            if member.where is not Where.DISABLED:
                assert member.where is Where.COOLING
                assert member.cool_until >= self.clock() + max(0.0, seconds)
        self._transitions(before)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seconds=SECONDS)
    def set_cooldown(self, data: st.DataObject, seconds: float) -> None:
        state = self._any_state(data)
        before = self._snap()
        where = state.where
        self.ring.set_cooldown(state, seconds)
        if where in (Where.DISABLED, Where.REMOVED):
            assert state.where is where
        elif seconds <= 0:
            assert state.where is Where.READY
        else:
            assert state.where is Where.COOLING
            assert state.cool_until == self.clock() + seconds
        self._transitions(before, lowered=frozenset({state}))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), reason=REASONS)
    def disable(self, data: st.DataObject, reason: str) -> None:
        state = self._any_state(data)
        before = self._snap()
        where = state.where
        changed = self.ring.disable(state, reason)
        assert changed is (where not in (Where.DISABLED, Where.REMOVED))
        assert state.where is (Where.REMOVED if where is Where.REMOVED else Where.DISABLED)
        self._transitions(before)

    @rule(seconds=ADVANCE)
    def advance(self, seconds: float) -> None:
        before = self._snap()
        self.clock.now += seconds
        wait = self.ring.next_ready_in()
        if wait is not None:
            assert wait >= 0
        self._transitions(before)

    # -- budgets -------------------------------------------------------------------------------
    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def send(self, data: st.DataObject) -> None:
        state = self._any_state(data)
        before = self._snap()
        marks = self.ring.sent(state)
        self.marks.append(marks)
        if data.draw(st.booleans()):
            self.ring.answered(state, marks)
        self._transitions(before)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), budget=BUDGETS)
    def learn(self, data: st.DataObject, budget: ServerBudget) -> None:
        state = self._any_state(data)
        marks = data.draw(st.sampled_from([None, *self.marks[-3:]]))
        before = self._snap()
        pool_before = state.pool
        self.ring.learn(state, budget, marks)
        if state.where is Where.REMOVED or state.spec.pool is not None:
            assert state.pool is pool_before  # a removed or user-pooled key never moves
        # An answer showing budget left frees the keys its pool held only for a spent
        # request budget (our own estimate): their deadlines may move earlier.
        freed = frozenset(
            member for member in state.pool.members
            if before[member][2].startswith("budget spent (RPM)")
        )
        self._transitions(before, lowered=freed)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def probe(self, data: st.DataObject) -> None:
        state = self._any_state(data)
        before = self._snap()
        self.ring.probe(state)
        self._transitions(before)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def every_key_is_in_exactly_one_place(self) -> None:
        ring = self.ring
        states = ring._states
        in_buckets: Counter[KeyState] = Counter()
        bucket_of: dict[KeyState, int] = {}
        for index, bucket in enumerate(ring._buckets):
            for state in bucket:
                in_buckets[state] += 1
                bucket_of[state] = index
        current = Counter(entry[2] for entry in ring._cooling if ring._is_current(entry))
        for key, state in states.items():
            assert state.key == key
            if state.where is Where.READY:
                assert in_buckets[state] == 1, f"{state!r} in {in_buckets[state]} buckets"
                assert bucket_of[state] == state.level, "ready key in the wrong bucket"
                assert state.level >= ring._low, "ready key below the lowest bucket mark"
                assert current[state] == 0
            elif state.where is Where.COOLING:
                assert in_buckets[state] == 0, f"cooling {state!r} in a ready bucket"
                assert current[state] >= 1, f"cooling {state!r} has no deadline in the heap"
            else:
                assert state.where is Where.DISABLED, f"{state!r} in the ring as {state.where}"
                assert in_buckets[state] == 0 and current[state] == 0
        for state in in_buckets:
            assert states.get(state.key) is state, f"{state!r} in a bucket but not in the ring"
        for state in self.removed:
            assert state.where is Where.REMOVED
            assert states.get(state.key) is not state
            assert in_buckets[state] == 0

    @invariant()
    def in_flight_equals_choices_minus_releases(self) -> None:
        for state, model in self.model.items():
            assert state.in_flight == model.choices - model.releases, (state, model)
            assert state.in_flight >= 0
            expected = state.in_flight if state.weight == 1.0 else int(
                state.in_flight / state.weight
            )
            assert state.level == expected

    @invariant()
    def counters_follow_the_rules_applied(self) -> None:
        for state, model in self.model.items():
            assert (state.calls, state.successes, state.rate_limits, state.failures) == (
                model.calls, model.successes, model.rate_limits, model.failures,
            ), (state, model)

    @invariant()
    def each_pool_counts_the_calls_of_its_members(self) -> None:
        ring = self.ring
        membership: Counter[KeyState] = Counter()
        for name, pool in ring._pools.items():
            assert pool.name == name
            assert pool.members, f"empty pool {name} kept"
            for member in pool.members:
                membership[member] += 1
                assert member.pool is pool
            assert pool.in_flight == sum(m.in_flight for m in pool.members), (
                f"pool {name}: in_flight {pool.in_flight} but its members have "
                f"{[m.in_flight for m in pool.members]}"
            )
            assert pool.in_flight >= 0
        for state in ring._states.values():
            assert membership[state] == 1, f"{state!r} is in {membership[state]} pools"
            assert ring._pools.get(state.pool.name) is state.pool


def test_a_call_ending_after_its_key_was_removed_leaves_its_pool_count_alone() -> None:
    """The shortest sequence the machine above finds: ``remove`` takes the key's calls off
    its pool, and the call that ends later takes itself off again."""
    a, b = KEYS[:2]
    ring = KeyRing([Key(a, pool="P1"), Key(b, pool="P1")], clock=FakeClock())
    held = ring.choose()
    assert held is not None and held.pool.in_flight == 1
    other = ring.find(b if held.key == a else a)
    assert other is not None
    ring.remove(held.key)
    assert other.pool.in_flight == 0
    ring.succeed(held)  # the call on the removed key ends
    assert held.in_flight == 0
    assert other.pool.in_flight == 0


# Deterministic (a fixed seed, no example database) and without the shrink phase, which on a
# failure can take minutes: the failing steps are printed as found.  RING_SHRINK=1 shrinks.
_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)
# 300 examples of up to 50 steps (about 10 s): with 150 of 40, a seed found a ring bug
# that needs choose, remove and a later release in that order only three times in four.
RingMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    database=None,
    derandomize=True,
    phases=(*_PHASES, Phase.shrink) if os.environ.get("RING_SHRINK") else _PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKeyRingStateMachine = RingMachine.TestCase
