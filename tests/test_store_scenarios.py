"""One suite, every store: the same scenarios against the memory store and the Redis store.

The key state has two implementations — the in-process ring, and Redis's scripts — and
nothing else keeps them one algorithm. Each scenario here drives a KeyManager built on one
store through the seam the decorator uses (leases ended with a verdict, the pooled clients'
budget reports) and the public API, and asserts what a user sees: which key a call gets, each
key's state, reason and cooldown, and the errors. Every scenario runs on both stores and must
give the same answers. Times are real but generous (cooldowns of tens of seconds, checked to
within a second); only made-up keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import pytest
from redisserver import NO_REDIS, RedisServer, redis_binary
from wire import made_up_keys, rate_limited

from stable_openai import AllKeysCoolingError, AllKeysDisabledError, Key, KeyManager
from stable_openai._budget import ServerBudget
from stable_openai._cause import Cause
from stable_openai._lease import Lease
from stable_openai._manager import lease
from stable_openai._model import (
    ALLOWANCE_PROBES,
    BLIND_FIRST,
    MIXED,
    PACE_BACKOFF,
    PER_DAY,
    PERIOD_SLACK,
    PROBE_FOR,
    PROBE_WAIT,
    SLIDE_SLACK,
)
from stable_openai._policy import Action, Fate, Verdict
from stable_openai._ring import KeyState

MakeManager = Callable[[Sequence["str | Key"]], KeyManager]

RATE_LIMITED = Verdict(
    Fate.COOL, Action.RETRY_ELSEWHERE, 30.0, "rate limited (429)", rate_limited=True,
    pooled=True, cause=Cause.RATE_LIMITED,
)
REVOKED = Verdict(
    Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (401 invalid_api_key)",
    cause=Cause.REVOKED,
)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    binary = redis_binary()
    if binary is None:
        pytest.skip(NO_REDIS)
    server = RedisServer(binary).start()
    yield server
    server.kill()


class _Failures(logging.Handler):
    """The Redis backend's reports that it failed, whatever level pytest logs at."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Redis backend"):
            self.seen.append(record.getMessage())


@pytest.fixture(autouse=True)
def _redis_never_failed() -> Iterator[None]:
    """Both stores must decide alike, and Redis by its scripts: a script that fails (an error
    in the Lua) would leave the Redis manager on its process's own key state — the memory
    store's rules — and a test comparing the two would pass whatever the scripts do."""
    logger = logging.getLogger("stable_openai")
    failures, level = _Failures(), logger.level
    logger.addHandler(failures)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.removeHandler(failures)
        logger.setLevel(level)
    assert not failures.seen, failures.seen


@pytest.fixture(params=["memory", "redis"])
def make_manager(request: pytest.FixtureRequest) -> Iterator[MakeManager]:
    """Build KeyManagers on the store of the test's parameter; close them afterwards."""
    made: list[KeyManager] = []
    url = None
    if request.param == "redis":
        pytest.importorskip("redis", reason='needs redis-py: pip install "stable-openai[redis]"')
        server: RedisServer = request.getfixturevalue("redis_server")
        url = f"{server.url}?namespace=s-{uuid.uuid4().hex[:12]}"

    def make(keys: Sequence[str | Key]) -> KeyManager:
        manager = KeyManager.create(keys, backend=url)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def take(manager: KeyManager, avoid: set[KeyState] | None = None) -> Lease:
    """A lease at once, or the error that says why there is none."""
    taken, waited = lease(manager, avoid, 0.0)
    assert waited == 0.0
    return taken


def rows(manager: KeyManager) -> dict[str, dict[str, Any]]:
    """``stats()`` by masked key, with what a scenario compares."""
    return {
        row["key"]: {
            "state": row["state"], "reason": row["reason"], "pool": row["pool"],
            "left": round(row["seconds_left"]) if row["state"] == "cooling" else None,
            "calls": row["calls"], "successes": row["successes"],
            "rate_limits": row["rate_limits"], "failures": row["failures"],
            "in_flight": row["in_flight"],
        }
        for row in manager.stats()
    }


def masked(key: str) -> str:
    return f"{key[:3]}…{key[-4:]}"


def succeed_with_budget(taken: Lease, left: int, reset: float) -> None:
    """End ``taken`` with an answer whose headers say ``left`` of 10 requests, full again in
    ``reset`` seconds (what a pooled client's hooks report: with the model its request's
    body asked for)."""
    budget = ServerBudget(requests_limit=10, requests_left=left, requests_reset=reset)
    taken.owner.answered(taken.state, budget, None, taken.model)
    taken.succeed()


# --------------------------------------------------------------------------- choosing


def test_idle_keys_are_taken_in_turn_and_the_least_loaded_first(
    make_manager: MakeManager,
) -> None:
    keys = made_up_keys(3, "order")
    manager = make_manager(keys)
    got = []
    for _ in range(6):
        taken = take(manager)
        got.append(taken.key)
        taken.succeed()
    assert got == keys + keys  # least recently used first
    held = take(manager)
    second = take(manager)  # fewest calls in flight: not the one held
    third = take(manager)
    assert [held.key, second.key, third.key] == keys
    fourth = take(manager)  # every key has one in flight: the least recently used again
    assert fourth.key == keys[0]
    for taken in (held, second, third, fourth):
        taken.succeed()
    counts = rows(manager)
    assert [counts[masked(k)]["calls"] for k in keys] == [4, 3, 3]
    assert all(row["in_flight"] == 0 for row in counts.values())


def test_keys_to_avoid_are_taken_only_when_no_other_is_ready(make_manager: MakeManager) -> None:
    keys = made_up_keys(2, "avoid")
    manager = make_manager(keys)
    first = take(manager)
    first.succeed()
    second = take(manager)
    second.succeed()
    assert [first.key, second.key] == keys
    # keys[0] is next in turn, but the call avoids it.
    taken = take(manager, avoid={first.state})
    assert taken.key == keys[1]
    taken.succeed()
    both = take(manager, avoid={first.state, second.state})  # nothing else: an avoided one
    assert both.key in keys
    both.abandon()


# --------------------------------------------------------------------------- failures


def test_a_rate_limit_cools_the_keys_pool_and_the_others_go_on(
    make_manager: MakeManager,
) -> None:
    a, b, c = made_up_keys(3, "pool")
    manager = make_manager([Key(a, pool="shared"), Key(b, pool="shared"), c])
    taken = take(manager)
    assert taken.key == a
    taken.fail(RATE_LIMITED, None)
    seen = rows(manager)
    for key in (a, b):
        assert (seen[masked(key)]["state"], seen[masked(key)]["left"]) == ("cooling", 30)
        assert seen[masked(key)]["reason"] == "rate limited (429)"
        assert seen[masked(key)]["pool"] == "shared"
    assert seen[masked(a)]["rate_limits"] == 1
    assert seen[masked(c)]["state"] == "ready"
    other = take(manager)
    assert other.key == c  # the only key ready
    other.fail(RATE_LIMITED, None)  # its own pool: now every key cools
    with pytest.raises(AllKeysCoolingError) as info:
        take(manager)
    assert info.value.reasons == {"rate limited (429)": 3}
    assert round(info.value.retry_after) == 30


def test_keys_given_again_with_other_settings_take_them(make_manager: MakeManager) -> None:
    """A pool and a pace given to keys already present apply (they were ignored)."""
    a, b, c = made_up_keys(3, "respec")
    manager = make_manager([a, b, c])
    manager.add_keys([Key(a, pool="team"), Key(b, pool="team", rpm=60)])
    seen = rows(manager)
    assert [seen[masked(k)]["pool"] for k in (a, b)] == ["team", "team"]
    taken = take(manager)
    assert taken.key in (a, b)  # least recently used first: a, b, then c
    taken.fail(RATE_LIMITED, None)  # cools its pool: a and b, now pool-mates
    seen = rows(manager)
    assert [seen[masked(k)]["state"] for k in (a, b, c)] == ["cooling", "cooling", "ready"]


def test_a_429_naming_an_organization_puts_its_keys_in_one_pool(
    make_manager: MakeManager,
) -> None:
    a, b, c = made_up_keys(3, "org")
    manager = make_manager([a, b, c])
    first = take(manager)
    first.fail(RATE_LIMITED, rate_limited("30s", organization="org-learned"))
    seen = rows(manager)
    assert seen[masked(a)]["pool"] == "org-learned"
    assert seen[masked(a)]["state"] == "cooling"
    assert seen[masked(b)]["state"] == "ready"  # not known to share it yet
    second = take(manager)
    assert second.key == b
    second.fail(RATE_LIMITED, rate_limited("30s", organization="org-learned"))
    seen = rows(manager)
    assert [seen[masked(k)]["pool"] for k in (a, b)] == ["org-learned", "org-learned"]
    assert seen[masked(c)]["state"] == "ready"
    assert seen[masked(c)]["pool"].startswith("own")


def test_429s_whose_headers_name_two_projects_of_one_organization_make_two_pools(
    make_manager: MakeManager,
) -> None:
    """Limits are per project: the keys of two projects are two pools though their 429s name
    one organization (a success's headers name the project too)."""
    a, b, c = made_up_keys(3, "projects")
    manager = make_manager([a, b, c])
    for key, project in ((a, "proj_one"), (b, "proj_two"), (c, "proj_one")):
        taken = take(manager)
        assert taken.key == key
        headers = {"openai-organization": "org-one", "openai-project": project}
        taken.fail(RATE_LIMITED, rate_limited("30s", headers, organization="org-one"))
    seen = rows(manager)
    assert [seen[masked(k)]["pool"] for k in (a, b, c)] == [
        "org-one/proj_one", "org-one/proj_two", "org-one/proj_one"]


def test_a_pool_is_paced_from_its_429s_and_the_others_are_not(
    make_manager: MakeManager,
) -> None:
    """A 429 whose numbers give one request per 20 s paces its pool: after the 429's own
    cooldown, one call, then the next two slots of 20 s (a little more) later; another pool
    is free."""
    a, b = made_up_keys(2, "paced")
    manager = make_manager([Key(a, pool="one"), Key(b, pool="two")])
    first = take(manager)
    assert first.key == a
    first.fail(dataclasses.replace(RATE_LIMITED, seconds=0.0), rate_limited("20s"))
    other = take(manager)
    assert other.key == b
    other.succeed()
    again = take(manager)
    assert again.key == a  # its cooldown (0 s) is over: one call goes ...
    again.succeed()
    seen = rows(manager)
    # ... on credit (its pace restarted empty where the server admits again), so the next
    # waits two slots of 20 s / 0.97.
    assert seen[masked(a)]["reason"] == "paced (429s)"
    assert seen[masked(a)]["left"] == 41
    assert seen[masked(b)]["state"] == "ready"
    assert take(manager).key == b


def _a_429_of_gpt_4o_in_a_pool_of_two_models(
    make_manager: MakeManager, key: str, seconds: float, delay: str, per: str = "min (RPM)"
) -> tuple[KeyManager, KeyManager]:
    """Two managers of ``key`` (one pool) on the test's store; in the first, a call of each
    of two models succeeds, then a gpt-4o call gets a 429 (of a limit ``per``) to try again
    in ``delay`` (one request per ``delay``), cooling for ``seconds``."""
    manager = make_manager([Key(key, pool="one")])
    other = make_manager([Key(key, pool="one")])
    _two_models_then_a_429(manager, seconds, delay, per)
    return manager, other


def _two_models_then_a_429(
    manager: KeyManager, seconds: float, delay: str, per: str = "min (RPM)"
) -> None:
    """On ``manager`` (of one pool): a call of each of two models succeeds, then a gpt-4o
    call gets a 429 (of a limit ``per``) to try again in ``delay`` (one request per
    ``delay``), cooling for ``seconds``."""
    for model in ("gpt-4o-mini", "gpt-4o"):
        taken = take(manager)
        taken.model = model
        taken.succeed()
    taken = take(manager)
    taken.model = "gpt-4o"
    taken.fail(dataclasses.replace(RATE_LIMITED, seconds=seconds),
               rate_limited(delay, model="gpt-4o", numbers="Limit 2, Used 2, Requested 1",
                            per=per))


def test_a_429_of_one_of_two_models_holds_it_in_every_process_not_the_keys(
    make_manager: MakeManager,
) -> None:
    """A pool whose calls asked for two models: a 429 of gpt-4o on a gpt-4o call holds
    gpt-4o there for the 429's delay — its keys stay ready for gpt-4o-mini — and another
    process using the same store sees the hold when it takes a key of that pool (with
    Redis; in memory, the other manager shares nothing and sees none)."""
    (a,) = made_up_keys(1, "lanes")
    manager, other = _a_429_of_gpt_4o_in_a_pool_of_two_models(make_manager, a, 30.0, "30s")
    assert rows(manager)[masked(a)]["state"] == "ready"
    again = take(manager)
    assert again.owner.lane_held(again.state, "gpt-4o") > 25
    assert again.owner.lane_held(again.state, "gpt-4o-mini") == 0
    assert again.owner.lane_held(again.state, "gpt-4o" + PER_DAY) == 0  # a minute's
    again.give_back()
    seen = take(other)
    shared = manager.backend.shared
    assert (seen.owner.lane_held(seen.state, "gpt-4o") > 25) is shared
    seen.give_back()


def test_a_model_held_for_a_per_day_limit_is_known_as_such_in_every_process(
    make_manager: MakeManager,
) -> None:
    """A daily 429 of gpt-4o holds it as a per-minute one does, and marks the hold as a
    day's (``PER_DAY``), so that no process waits for it.  (In memory, the other manager
    shares nothing.)"""
    (a,) = made_up_keys(1, "daylane")
    manager, other = _a_429_of_gpt_4o_in_a_pool_of_two_models(
        make_manager, a, 30.0, "30s", per="day (RPD)")
    again = take(manager)
    assert again.owner.lane_held(again.state, "gpt-4o") > 25
    assert again.owner.lane_held(again.state, "gpt-4o" + PER_DAY) > 25
    again.give_back()
    seen = take(other)
    shared = manager.backend.shared
    assert (seen.owner.lane_held(seen.state, "gpt-4o" + PER_DAY) > 25) is shared
    seen.give_back()


def test_a_model_held_by_a_429_with_numbers_is_then_paced_in_every_process(
    make_manager: MakeManager,
) -> None:
    """In a pool serving two models, a 429 of gpt-4o whose numbers give one request per 2 s
    holds gpt-4o for its delay, then paces it there at 0.97 of that rate: one call goes, and
    the next is held for its slot — in every process sharing the store (in memory, the
    other manager shares nothing: it neither holds nor paces)."""
    (a,) = made_up_keys(1, "lanepace")
    manager, other = _a_429_of_gpt_4o_in_a_pool_of_two_models(make_manager, a, 0.0, "2s")
    first = take(manager)
    assert first.owner.lane_held(first.state, "gpt-4o") == 0  # its place in the pace
    assert first.owner.lane_held(first.state, "gpt-4o-mini") == 0
    first.give_back()
    seen = take(other)
    held = seen.owner.lane_held(seen.state, "gpt-4o")
    shared = manager.backend.shared
    assert (held > 1.9) is shared, held  # the next slot is 2 s / 0.97 away
    assert seen.owner.lane_held(seen.state, "gpt-4o-mini") == 0
    seen.give_back()


def test_a_pool_that_turns_out_to_serve_two_models_is_held_by_one_models_headers_for_it(
    make_manager: MakeManager,
) -> None:
    """A gpt-4o answer's headers say the budget is spent: the pool's keys wait for the reset
    — until a gpt-4o-mini call succeeds there: the headers were of gpt-4o's limit, not the
    pool's, and the keys are free again; then a gpt-4o answer that shows gpt-4o's budget
    spent holds gpt-4o there for one request's refill and paces it (as a 429 with those
    numbers would), and the keys go on serving gpt-4o-mini (in both stores)."""
    a, b = made_up_keys(2, "twomodels")
    manager = make_manager([Key(a, pool="one"), Key(b, pool="one")])
    first, second = take(manager), take(manager)
    first.model, second.model = "gpt-4o", "gpt-4o-mini"
    succeed_with_budget(first, left=0, reset=30.0)
    assert {row["reason"] for row in rows(manager).values()} == {"budget spent (RPM)"}
    second.succeed()
    assert {row["state"] for row in rows(manager).values()} == {"ready"}
    third = take(manager)
    third.model = "gpt-4o"
    succeed_with_budget(third, left=1, reset=30.0)  # gpt-4o's budget, not the pool's
    assert {row["state"] for row in rows(manager).values()} == {"ready"}
    fourth = take(manager)
    assert fourth.owner.lane_held(fourth.state, "gpt-4o") == 0  # one left
    fourth.model = "gpt-4o"
    succeed_with_budget(fourth, left=0, reset=30.0)  # gpt-4o's is spent: only gpt-4o waits
    assert {row["state"] for row in rows(manager).values()} == {"ready"}
    fifth = take(manager)
    # for one request's refill (30 s / 10), then paced at 0.97 × 10 in 30 s
    assert 2.5 < fifth.owner.lane_held(fifth.state, "gpt-4o") <= 3.0
    assert fifth.owner.lane_held(fifth.state, "gpt-4o-mini") == 0
    fifth.give_back()


def test_an_answer_that_names_its_pool_paces_its_model_in_that_pool_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """Keys given no pool: a's answers of two models name org-x (a pool serving several
    models); b's first answer names org-x too and shows gpt-4o's requests spent.  The ring
    moves b into org-x at the answer, Redis at the call's report: gpt-4o is held there for
    one request's refill in both stores (found by a review: Redis paced b's own pool, which
    serves no model, and the report then moved b into org-x without the hold)."""
    clock = FakeClock()
    a, b = made_up_keys(2, "joinpace")
    memory, shared = _on_one_clock([a, b], clock, redis_server)

    def answer(manager: KeyManager, key: str, left: int, model: str) -> None:
        context = contextvars.copy_context()
        other = manager._ring.find(b if key == a else a)
        taken = context.run(take, manager, {other} if other is not None else set())
        assert taken.key == key
        taken.model = model
        marks = context.run(taken.owner.sending, taken.state, 0.0)
        budget = ServerBudget(requests_limit=10, requests_left=left, requests_reset=1.0,
                              organization="org-x")
        context.run(taken.owner.answered, taken.state, budget, marks, model)
        context.run(taken.succeed)

    try:
        for manager in (memory, shared):
            answer(manager, a, 5, "gpt-4o-mini")
            answer(manager, a, 5, "gpt-4o")
            answer(manager, b, 0, "gpt-4o")
            assert {row["pool"] for row in manager.stats()} == {"org-x"}
            taken = take(manager)
            assert taken.owner.lane_held(taken.state, "gpt-4o") == pytest.approx(0.1), (
                manager.backend)
            assert taken.owner.lane_held(taken.state, "gpt-4o-mini") == 0
            taken.give_back()
    finally:
        memory.close()
        shared.close()


def test_a_models_pace_from_an_answer_holds_the_calls_next_request_on_an_event_loop(
    redis_server: RedisServer,
) -> None:
    """On an event loop, an answer that shows gpt-4o's requests spent (in a pool serving two
    models) holds gpt-4o before the call's next request asks, with no turn of the loop
    between — in both stores (found by a review: Redis was told in a task of its own, which
    had not run when the next request asked)."""
    import asyncio

    with _team_of_two(redis_server, "looppace") as (_, managers, _keys):

        async def settle() -> None:  # the reports this loop is sending
            await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))

        async def scenario(manager: KeyManager) -> float:
            for model, left in (("gpt-4o-mini", 5), ("gpt-4o", 5), ("gpt-4o", 0)):
                taken = take(manager)
                taken.model = model
                marks = taken.owner.sending(taken.state, 0.0)
                budget = ServerBudget(requests_limit=10, requests_left=left,
                                      requests_reset=1.0)
                taken.owner.answered(taken.state, budget, marks, model)
                if left:
                    taken.succeed()
                    await settle()
            held = taken.owner.lane_held(taken.state, "gpt-4o")  # (its next request)
            taken.succeed()
            await settle()
            return held

        for manager in managers:
            assert asyncio.run(scenario(manager)) == pytest.approx(0.1), manager.backend


def test_a_revoked_key_is_disabled_until_given_again(make_manager: MakeManager) -> None:
    a, b = made_up_keys(2, "revoked")
    manager = make_manager([a, b])
    for _ in range(2):
        taken = take(manager)
        taken.fail(REVOKED, None)
    seen = rows(manager)
    assert all(row["state"] == "disabled" for row in seen.values())
    assert all(row["reason"] == "revoked (401 invalid_api_key)" for row in seen.values())
    assert all(row["failures"] == 1 for row in seen.values())
    with pytest.raises(AllKeysDisabledError) as info:
        take(manager)
    assert info.value.reasons == {"revoked (401 invalid_api_key)": 2}
    assert manager.add_keys([a]) == 0  # not new: enabled again
    assert rows(manager)[masked(a)]["state"] == "ready"
    assert take(manager).key == a


# --------------------------------------------------------------------------- the user's cooldowns


def test_set_ttl_cools_exactly_and_zero_makes_ready(make_manager: MakeManager) -> None:
    a, b = made_up_keys(2, "ttl")
    manager = make_manager([a, b])
    assert manager.set_ttl(a, 20)
    assert manager.get_min_ttl() == 0.0
    assert round(manager.data[a]) == 20 and manager.data[b] == 0.0
    assert take(manager).key == b
    assert manager.set_ttl(b, 40)
    assert round(manager.get_min_ttl()) == 20
    with pytest.raises(AllKeysCoolingError) as info:
        take(manager)
    assert info.value.reasons == {"set_ttl": 2}
    assert round(info.value.retry_after) == 20
    assert manager.set_ttl(a, 0)
    assert take(manager).key == a


# --------------------------------------------------------------------------- budgets


def test_an_answer_that_says_the_budget_is_spent_cools_the_pool_until_its_reset(
    make_manager: MakeManager,
) -> None:
    a, b, c = made_up_keys(3, "budget")
    manager = make_manager([Key(a, pool="shared"), Key(b, pool="shared"), c])
    succeed_with_budget(take(manager), 0, 25.0)
    seen = rows(manager)
    for key in (a, b):
        assert (seen[masked(key)]["state"], seen[masked(key)]["left"]) == ("cooling", 25)
        assert seen[masked(key)]["reason"] == "budget spent (RPM)"
    assert seen[masked(c)]["state"] == "ready"
    assert seen[masked(a)]["successes"] == 1


def test_an_answer_with_budget_left_frees_a_pool_held_for_a_spent_one(
    make_manager: MakeManager,
) -> None:
    a, b = made_up_keys(2, "refill")
    manager = make_manager([Key(a, pool="shared"), Key(b, pool="shared")])
    early, late = take(manager), take(manager)  # both in flight
    succeed_with_budget(early, 0, 25.0)
    assert {row["reason"] for row in rows(manager).values()} == {"budget spent (RPM)"}
    # A later answer, from a new window, shows budget left: the pool is free again.
    succeed_with_budget(late, 8, 40.0)
    seen = rows(manager)
    assert [seen[masked(k)]["state"] for k in (a, b)] == ["ready", "ready"]
    assert take(manager).key in (a, b)


def test_client_side_pacing_holds_the_pool_between_requests(make_manager: MakeManager) -> None:
    (a,) = made_up_keys(1, "paced")
    manager = make_manager([Key(a, rpm=6)])  # one request per 10 s, none stored up
    first = take(manager)
    first.succeed()
    with pytest.raises(AllKeysCoolingError) as info:
        take(manager)
    assert info.value.reasons == {"paced (rpm)": 1}
    assert round(info.value.retry_after) == 10


def test_an_answer_with_budget_left_frees_only_keys_held_for_the_budget(
    make_manager: MakeManager,
) -> None:
    a, b, c = made_up_keys(3, "causes")
    manager = make_manager([Key(k, pool="shared") for k in (a, b, c)])
    early, late = take(manager), take(manager)  # a and b in flight
    assert manager.set_ttl(c, 50)  # held by the user, not by the budget
    succeed_with_budget(early, 0, 25.0)
    succeed_with_budget(late, 8, 40.0)
    seen = rows(manager)
    assert [seen[masked(k)]["state"] for k in (a, b)] == ["ready", "ready"]
    assert (seen[masked(c)]["state"], seen[masked(c)]["reason"]) == ("cooling", "set_ttl")
    assert seen[masked(c)]["left"] == 50


# --------------------------------------------------------------------------- step by step


#: A 429's headers that say its numbers (a request every 2 s, Limit 3) are a fixed window's:
#: the whole limit is back in 1 s, where a bucket would take 6 (``_limits.pace_of``).
WINDOW_HEADERS = {"x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                  "x-ratelimit-reset-requests": "1s"}
#: ... a sliding window's after a burst: the first of the 3 it counts ages out in 2 s ("try
#: again in"), the last in 2.5 s.
SLIDING_HEADERS = {**WINDOW_HEADERS, "x-ratelimit-reset-requests": "2.5s"}
#: ... and a refilling bucket's (all 3 refilled in 4 s, at a request every 2 s or so).
BUCKET_HEADERS = {**WINDOW_HEADERS, "x-ratelimit-reset-requests": "4s"}


class FakeClock:
    """One clock for both stores: the memory ring reads it, and the Redis scripts are given
    it instead of the server's time (``RedisBackend(clock=...)``)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _verdicts(rng: Any) -> Verdict:
    seconds = float(rng.choice([0.5, 2.0, 7.0, 30.0]))  # each step a sum of powers of 2
    return rng.choice([
        Verdict(Fate.COOL, Action.RETRY_ELSEWHERE, seconds, "rate limited (429)",
                rate_limited=True, pooled=True, cause=Cause.RATE_LIMITED),
        Verdict(Fate.COOL, Action.RETRY_ELSEWHERE, seconds, "rate limited (429)",  # no delay
                rate_limited=True, pooled=True, cause=Cause.RATE_LIMITED, hinted=False),
        Verdict(Fate.COOL, Action.RETRY_ELSEWHERE, seconds, "server error (500)",
                cause=Cause.SERVER_ERROR),
        REVOKED,
        dataclasses.replace(REVOKED, seconds=seconds),  # tried again after ``seconds``
        Verdict(Fate.KEEP, Action.RAISE, reason="bad request (400)",
                cause=Cause.NOT_A_KEY_PROBLEM),
    ])


def _outcome(manager: KeyManager, avoid: set[str]) -> tuple[Any, ...]:
    """What a take gives: the key, or the error with what it says."""
    states = {s for s in (manager._ring.find(k) for k in avoid) if s is not None}
    try:
        taken = take(manager, states or None)
    except (AllKeysCoolingError, AllKeysDisabledError) as exc:
        wait = round(getattr(exc, "retry_after", 0.0), 3)
        recheck = getattr(exc, "recheck_in", None)
        return type(exc).__name__, exc.reasons, wait, recheck and round(recheck, 3)
    return ("key", taken.key, taken)


def _on_one_clock(
    spec: Sequence[str | Key], clock: FakeClock, redis_server: RedisServer
) -> tuple[KeyManager, KeyManager]:
    """A memory manager and a Redis manager of the same keys, both on ``clock``."""
    pytest.importorskip("redis", reason='needs redis-py: pip install "stable-openai[redis]"')
    from stable_openai.backends import RedisBackend

    memory = KeyManager.create(spec, clock=clock)
    shared = KeyManager.create(spec, clock=clock, backend=RedisBackend(
        redis_server.url, namespace=f"lock-{uuid.uuid4().hex[:12]}", clock=clock,
        lease_seconds=1e6))  # leases expire in Redis only (a crashed worker): not here
    return memory, shared


def test_a_report_after_redis_lost_its_keys_counts_its_answer_as_memory_does(
    redis_server: RedisServer,
) -> None:
    """Redis restarts (loses every key) between a call's choice and its report, whose answer
    says the budget is spent: the report, sent again once the keys are registered anew,
    carries no lease nor place in the old records — but the rest of what it says, in both
    stores: the pool cools until the reset.  (Before: the retry blanked arguments by
    counting from the end of a list that had grown since, kept the old place, and Redis took
    the budget for 6 left.)"""
    import redis

    clock = FakeClock()
    (a,) = made_up_keys(1, "restart")
    memory, shared = _on_one_clock([Key(a, pool="one")], clock, redis_server)
    try:
        for manager in (memory, shared):
            for _ in range(5):
                context = contextvars.copy_context()
                taken = context.run(take, manager)
                marks = context.run(taken.owner.sending, taken.state, 0.0)
                context.run(taken.owner.answered, taken.state, None, marks)
                context.run(taken.succeed)
            context = contextvars.copy_context()
            taken = context.run(take, manager)
            marks = context.run(taken.owner.sending, taken.state, 0.0)
            if manager is shared:  # Redis restarted: this namespace is gone
                client = redis.Redis(port=redis_server.port)
                backend = cast(Any, shared.backend)
                for name in client.scan_iter(match=f"*{backend.namespace}*"):
                    client.delete(name)
                client.close()
            spent = ServerBudget(requests_limit=10, requests_left=0, requests_reset=30.0)
            context.run(taken.owner.answered, taken.state, spent, marks)
            context.run(taken.succeed)
            (row,) = manager.stats()
            assert (row["state"], row["reason"]) == ("cooling", "budget spent (RPM)"), (
                manager.backend)
    finally:
        memory.close()
        shared.close()


def test_many_keys_due_at_once_take_their_turn_after_the_ready_ones(
    redis_server: RedisServer,
) -> None:
    """More keys come off cooling at once than Redis reads in one batch: both stores still
    hand out the ready keys of the lowest load first, then the keys just made ready."""
    clock = FakeClock()
    keys = made_up_keys(40, "due")
    memory, shared = _on_one_clock(keys, clock, redis_server)
    try:
        for manager in (memory, shared):
            for key in keys[:36]:
                assert manager.set_ttl(key, 1.0)
        held = [take(memory), take(shared)]  # keys[36]: one call in flight
        assert [taken.key for taken in held] == [keys[36]] * 2
        clock.now += 2.0  # the 36 are due
        order = [[take(manager).key for _ in range(6)] for manager in (memory, shared)]
        assert order[0] == order[1] == [keys[37], keys[38], keys[39], *keys[:3]]
    finally:
        memory.close()
        shared.close()


@contextlib.contextmanager
def _team_of_two(
    redis_server: RedisServer, tag: str, pools: tuple[str, str] = ("team", "team")
) -> Iterator[tuple[FakeClock, tuple[KeyManager, KeyManager], tuple[str, str]]]:
    """Two keys in ``pools`` (one pool by default), in a memory manager and a Redis manager
    on one fake clock: the clock, the two managers (closed after), the keys."""
    clock = FakeClock()
    a, b = made_up_keys(2, tag)
    memory, shared = _on_one_clock([Key(a, pool=pools[0]), Key(b, pool=pools[1])], clock,
                                   redis_server)
    try:
        yield clock, (memory, shared), (a, b)
    finally:
        memory.close()
        shared.close()


def _bucket_told(manager: KeyManager, clock: FakeClock) -> None:
    """Nine calls on ``manager``'s one key, one each 10 ms, answered 5 ms later by OpenAI's
    bucket of 10 a second: the pool knows it is one, and its rate."""
    for n in range(1, 10):
        context = contextvars.copy_context()
        taken = context.run(take, manager)
        marks = context.run(taken.owner.sending, taken.state, 0.0)
        clock.now += 0.005
        budget = ServerBudget(requests_limit=10, requests_left=10 - n,
                              requests_reset=0.1 * n - 0.01 * (n - 1))
        context.run(taken.owner.answered, taken.state, budget, marks)
        context.run(taken.succeed)
        clock.now += 0.005


def _answer_for(
    manager: KeyManager, clock: FakeClock, after: float, left: int, reset: float,
    limit: int = 10,
) -> None:
    """``after`` seconds on, one call whose answer shows ``left`` of ``limit`` requests, the
    budget back in full in ``reset``."""
    clock.now += after
    context = contextvars.copy_context()
    taken = context.run(take, manager)
    marks = context.run(taken.owner.sending, taken.state, 0.0)
    context.run(taken.owner.answered, taken.state, ServerBudget(
        requests_limit=limit, requests_left=left, requests_reset=reset), marks)
    context.run(taken.succeed)


def test_a_days_reset_or_another_limit_ends_a_pools_bucket_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """Answers whose resets are over a minute away are of a day's limit (1000 a day here,
    and they agree on its rate): no pool is paced by a day's refill, and the spent pool waits
    for the reset (as far as a reset is trusted, an hour).  And a pool that knows its bucket
    (10 a second) is given another limit (20 a second): what it knew is forgotten, and the
    answers of the new one pace it — in both stores.  (Before, a day's bucket let every call
    go: its emptying time, clipped to an hour, was a day's refill past; kept, the old rate
    disagreed with the new answers and the pool waited for each reset.)"""
    clock = FakeClock()
    for case in ("day", "limit"):
        (a,) = made_up_keys(1, f"bucketend{case}")
        memory, shared = _on_one_clock([a], clock, redis_server)
        start = clock.now
        try:
            for manager in (memory, shared):
                clock.now = start
                if case == "day":
                    _answer_for(manager, clock, 0.0, 999, 86.4, 1000)
                    _answer_for(manager, clock, 1.0, 998, 171.8, 1000)
                    _answer_for(manager, clock, 1.0, 0, 86_400.0, 1000)
                    wait = 3600.0
                else:
                    _bucket_told(manager, clock)
                    _answer_for(manager, clock, 1.0, 10, 0.5, 20)
                    _answer_for(manager, clock, 0.1, 0, 1.0, 20)
                    wait = 1.0 - 18 / (20 / 0.999)
                with pytest.raises(AllKeysCoolingError) as info:
                    take(manager)
                assert info.value.retry_after == pytest.approx(wait, abs=0.001), (
                    manager.backend, case)
        finally:
            memory.close()
            shared.close()


def test_a_refilling_buckets_answers_hold_a_spent_pool_until_it_has_room_for_one(
    redis_server: RedisServer,
) -> None:
    """Nine calls, one each 10 ms, answered 5 ms later by OpenAI's bucket of 10 a second (the
    n-th shows n counted, less what refilled, and its reset): the pool holds until the bucket
    has room for two requests again (one of margin), about 0.11 s after the first call, not
    until the reset (0.9 s after the last); each call that goes then holds it a refill more
    — until one meets a 429: then the reset again — in both stores."""
    clock = FakeClock()
    (a,) = made_up_keys(1, "bucket")
    memory, shared = _on_one_clock([a], clock, redis_server)
    start = clock.now
    try:
        for manager in (memory, shared):
            clock.now = start
            _bucket_told(manager, clock)
            with pytest.raises(AllKeysCoolingError) as info:
                take(manager)
            assert info.value.reasons == {"budget spent (RPM)": 1}, manager.backend
            ready = clock.now + info.value.retry_after
            assert ready - start == pytest.approx(0.115, abs=0.01), manager.backend
            clock.now = ready
            context = contextvars.copy_context()
            taken = context.run(take, manager)
            context.run(taken.owner.sending, taken.state, 0.0)
            with pytest.raises(AllKeysCoolingError) as info:
                take(manager)
            assert info.value.retry_after == pytest.approx(0.1, rel=0.12), manager.backend
            # It meets a 429: others spend the bucket unseen (processes of their own, other
            # programs).  The pool waits for the reset again, even on an answer of the same
            # bucket (with it, the pool would go in about 0.2 s).
            context.run(taken.fail, RATE_LIMITED, rate_limited(
                "100ms", organization="org-bucket", numbers="Limit 10, Used 10, Requested 1"))
            _answer_for(manager, clock, 31.0, 0, 0.99)
            with pytest.raises(AllKeysCoolingError) as info:
                take(manager)
            assert info.value.retry_after == pytest.approx(0.99), manager.backend
    finally:
        memory.close()
        shared.close()


def _call_on(
    manager: KeyManager, key: str, keys: Sequence[str]
) -> Callable[[int, str], None]:
    """A call on ``key`` (the other ``keys`` avoided), its request sent: returns what answers
    it, with ``left`` of 10 requests (full again in 1 s) and the organization named."""
    context = contextvars.copy_context()
    others = {manager._ring.find(k) for k in keys if k != key}
    taken = context.run(take, manager, {s for s in others if s is not None})
    assert taken.key == key
    marks = context.run(taken.owner.sending, taken.state, 0.0)

    def answer(left: int, organization: str) -> None:
        budget = ServerBudget(requests_limit=10, requests_left=left, requests_reset=1.0,
                              organization=organization)
        context.run(taken.owner.answered, taken.state, budget, marks)
        context.run(taken.succeed)

    return answer


def test_a_key_that_joins_a_pool_by_its_own_answer_leaves_that_request_answered_there(
    redis_server: RedisServer,
) -> None:
    """Keys given no pool: b's answer names org-x, b has a call in flight, and a's answer
    moves a into org-x.  The move holds a's calls in flight as unanswered there — not the
    one whose answer moved it.  The ring held that one too (found by a review): b's next
    answer, 2 left, less b's call in flight and that phantom, left 0 and memory cooled the
    pool, while Redis, which forgets the call at its report, had 1 left."""
    clock = FakeClock()
    a, b = made_up_keys(2, "joinanswered")
    memory, shared = _on_one_clock([a, b], clock, redis_server)

    try:
        for manager in (memory, shared):
            _call_on(manager, b, (a, b))(9, "org-x")  # b's pool is org-x
            in_flight = _call_on(manager, b, (a, b))
            _call_on(manager, a, (a, b))(7, "org-x")  # a joins org-x by this answer
            _call_on(manager, b, (a, b))(2, "org-x")  # 2 left, less b's call in flight: 1
            take(manager).give_back()  # (before: memory cooling, "budget spent (RPM)")
            in_flight(5, "org-x")
    finally:
        memory.close()
        shared.close()


def test_a_key_that_moves_twice_leaves_the_answered_request_in_neither_pool(
    redis_server: RedisServer,
) -> None:
    """a's call a1 leaves in a's own pool; a's next answer moves a into org-x, where a1 is
    held as unanswered; a1's answer then moves a into org-y.  There a1 is answered, not
    unanswered: c's answer, 2 left less c's call in flight, leaves 1 — org-y's keys go on in
    both stores.  (Found by a review: the ring kept a1 unanswered in org-y when the call had
    been sent in another pool than the one it left, and cooled org-y.)"""
    clock = FakeClock()
    a, b, c = made_up_keys(3, "movetwice")
    memory, shared = _on_one_clock([a, b, c], clock, redis_server)

    try:
        for manager in (memory, shared):
            _call_on(manager, b, (a, b, c))(9, "org-x")
            _call_on(manager, c, (a, b, c))(9, "org-y")
            a1 = _call_on(manager, a, (a, b, c))
            _call_on(manager, a, (a, b, c))(8, "org-x")
            c1 = _call_on(manager, c, (a, b, c))
            a1(7, "org-y")
            _call_on(manager, c, (a, b, c))(2, "org-y")
            b_state = manager._ring.find(b)
            taken = take(manager, {b_state} if b_state is not None else None)
            assert taken.key in (a, c), manager.backend  # (before: memory cooling org-y)
            taken.give_back()
            c1(5, "org-y")
    finally:
        memory.close()
        shared.close()


def test_a_request_unanswered_for_a_minute_no_longer_holds_budget_back(
    redis_server: RedisServer,
) -> None:
    """A request that left and never got an answer (its call was abandoned) counts as one the
    server may not have counted yet — until UNANSWERED_FOR has passed: then an answer's
    remainder is trusted whole, in both stores, though the pool never drained."""
    from stable_openai._model import UNANSWERED_FOR

    clock = FakeClock()
    a, b = made_up_keys(2, "unanswered")
    spec = [Key(a, pool="team"), Key(b, pool="team")]
    memory, shared = _on_one_clock(spec, clock, redis_server)
    try:
        for manager in (memory, shared):
            context = contextvars.copy_context()

            def sent(manager: KeyManager = manager) -> tuple[Lease, Any]:
                taken = take(manager)
                return taken, taken.owner.sending(taken.state, 0.0)

            first, _ = context.run(sent)  # leaves, then is abandoned: never answered
            context.run(first.abandon)
            other = contextvars.copy_context()
            still, _ = other.run(sent)  # stays in flight: the pool never drains
            clock.now += UNANSWERED_FOR + 1.0
            third = contextvars.copy_context()
            answer, mark = third.run(sent)
            budget = ServerBudget(requests_limit=10, requests_left=5, requests_reset=30.0)
            third.run(answer.owner.answered, answer.state, budget, mark)
            third.run(answer.succeed)
            granted = 0
            with pytest.raises(AllKeysCoolingError):
                while True:
                    context.run(take, manager)
                    granted += 1
            assert granted == 5, manager.backend  # 5 left: the two old requests were counted
            clock.now -= UNANSWERED_FOR + 1.0
            other.run(still.abandon)
    finally:
        memory.close()
        shared.close()


@pytest.mark.parametrize("told", ["size", "nothing"])
def test_after_a_429_without_a_rate_the_pool_gets_a_windows_worth_then_one_call_learns_more(
    told: str, redis_server: RedisServer,
) -> None:
    """Two calls succeed; then a 429 that gives no rate: its headers make its numbers a fixed
    window's (Limit 3; it ends in 0.5 s), or it has no numbers at all.  No pace is known yet:
    once the pool has cooled, its keys take 3 calls (the window's size), or 2 (what the pool
    was admitted), and then wait a moment before one more goes (its 429 will tell where the
    limit stands) — in both stores.  (Before: every call waiting went, and all past the limit
    met a 429 of a server that counts them.)"""
    with _team_of_two(redis_server, f"window{told}") as (clock, managers, _):
        start = clock.now
        allowed = 3 if told == "size" else 2
        for manager in managers:
            clock.now = start
            for _ in range(2):
                take(manager).succeed()
            error = (rate_limited("2s", organization="org-w", headers=WINDOW_HEADERS)
                     if told == "size" else
                     rate_limited("2s", organization="org-w", numbers="no numbers"))
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=0.5), error)
            clock.now = start + 0.5
            for _ in range(allowed):
                take(manager).succeed()
            with pytest.raises(AllKeysCoolingError) as raised:
                take(manager)
            assert raised.value.reasons == {"paced (429s)": 2}, manager.backend
            assert raised.value.retry_after == pytest.approx(PROBE_WAIT)
            for _ in range(ALLOWANCE_PROBES):  # one call at a time, for a 429 to tell more
                clock.now += 2 * PROBE_WAIT
                take(manager).succeed()
                with pytest.raises(AllKeysCoolingError):  # (each held as long for its answer)
                    take(manager)
            # None met a 429 here: the allowance is over, nothing holds the calls back (before
            # the review: the pool was held PROBE_WAIT after every call, until a 429 came).
            clock.now += 2 * PROBE_WAIT
            for _ in range(10):
                take(manager).succeed()


@pytest.mark.parametrize("probe", ["succeeded", "in flight", "met a 429"])
def test_a_429_that_says_no_delay_backs_off_one_call_of_the_pace_its_span_measures(
    probe: str, redis_server: RedisServer,
) -> None:
    """A 429 with no numbers and no delay cools the pool BLIND_FIRST; its allowance of two
    calls succeeds; the next such 429 closes a span of 1.3125 s with 2 admitted: the pool
    cools for one call of the pace that span measures (0.97 × 2 / 1.3125 a second) — or, with
    a call still in flight (its success will be counted), of the pace it cannot be below; and
    when that call then meets a 429 of the same excess, the span measured — in both stores,
    not BLIND_FIRST again."""
    in_flight = probe != "succeeded"
    blind = dataclasses.replace(RATE_LIMITED, hinted=False)
    with _team_of_two(redis_server, f"blind{in_flight}") as (clock, managers, _):
        start = clock.now
        for manager in managers:
            clock.now = start
            for _ in range(2):
                take(manager).succeed()
            take(manager).fail(blind, rate_limited("2s", numbers="no numbers"))
            with pytest.raises(AllKeysCoolingError) as raised:
                take(manager)
            assert raised.value.retry_after == pytest.approx(BLIND_FIRST)
            clock.now = start + 1.0
            for _ in range(2):  # its allowance: what the pool was admitted
                take(manager).succeed()
            clock.now = start + 1.25
            taken = take(manager)  # (one more, a moment later)
            if not in_flight:
                taken.succeed()
            clock.now = start + 1.3125
            take(manager).fail(blind, rate_limited("2s", numbers="no numbers"))
            with pytest.raises(AllKeysCoolingError) as raised:
                take(manager)
            admitted = 3 if not in_flight else 2  # (the probe's success: not yet)
            assert raised.value.retry_after == pytest.approx(
                1.3125 / (PACE_BACKOFF * admitted)), manager.backend
            if probe == "met a 429":
                clock.now = start + 1.375
                taken.fail(blind, rate_limited("2s", numbers="no numbers"))
                with pytest.raises(AllKeysCoolingError) as raised:
                    take(manager)
                assert raised.value.retry_after == pytest.approx(
                    1.3125 / (PACE_BACKOFF * 2)), manager.backend
            elif in_flight:
                taken.succeed()


def test_a_pool_that_knows_the_servers_windows_gets_their_size_at_once_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """A server that counts in fixed windows of 3 calls (1 s): a 429 says window 0 ends at
    0.5; window 1 gets 3 calls, and a probe's 429 says it ends at 1.5 — a window after the
    first end: the windows are known.  Each window then gets its 3 calls at once, and the 3rd
    holds the pool until a little after the window's end (PERIOD_SLACK of it), in both
    stores.  (Before, the two 429s measured a pace, 0.97 × 3 over the span: one call every
    0.34 s, and less than 3 a window.)"""
    with _team_of_two(redis_server, "windows") as (clock, managers, _):
        start = clock.now
        for manager in managers:
            clock.now = start
            take(manager).succeed()
            error = rate_limited("2s", organization="org-w", headers=WINDOW_HEADERS)
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=0.5), error)
            clock.now = start + 0.5
            for _ in range(3):
                take(manager).succeed()
            clock.now = start + 0.625
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=0.875), error)
            for window in (1.5, 2.625, 3.625):
                clock.now = start + window
                for _ in range(3):
                    take(manager).succeed()
                with pytest.raises(AllKeysCoolingError) as raised:
                    take(manager)
                assert raised.value.reasons == {"paced (429s)": 2}, manager.backend
                ends = math.floor(window - 0.5) + 1.5 + PERIOD_SLACK
                assert raised.value.retry_after == pytest.approx(ends - window), manager.backend


def test_a_pool_keeps_to_a_sliding_window_and_the_shape_of_its_burst_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """A sliding window of 3: a burst of 3 at 0, and a 429 says the first ages out in 2 s,
    the last in 2.5 s (SLIDING_HEADERS).  The pool keeps to the window: one call at 2, two at
    2.5 (not one at 2 and the next a pace's 1 / (0.97 × 3 / 2.5) = 0.86 s later: a pace
    spreads the burst and loses part of each window), each counted for 2.5 × (1 +
    SLIDE_SLACK) from when it left.  A 429 that says a call came 0.375 s early moves the
    window: what the pool counts ages out that much later (its last no sooner than the 429's
    headers say), and the window is longer; one whose reset shows the window longer still
    moves it by as much."""
    period = 2.5 * (1 + SLIDE_SLACK)
    with _team_of_two(redis_server, "sliding") as (clock, managers, _):
        start = clock.now
        for manager in managers:
            clock.now = start
            for _ in range(3):
                take(manager).succeed()
            error = rate_limited("2s", organization="org-s", headers=SLIDING_HEADERS)
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=2.0), error)

            def held(after: float, manager: KeyManager = manager) -> None:
                with pytest.raises(AllKeysCoolingError) as raised:
                    take(manager)
                assert raised.value.retry_after == pytest.approx(after), manager.backend
                assert raised.value.reasons == {"paced (429s)": 2}, manager.backend

            clock.now = start + 2.0
            take(manager).succeed()
            held(0.5)
            clock.now = start + 2.5
            for _ in range(2):
                take(manager).succeed()
            held(2.0 + period - 2.5)  # (the call that left at 2 ages out first)
            clock.now = start + 2.0 + period
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=0.375), error)
            held(2.5 + period - clock.now + start)  # (held as counted: a later deadline)
            clock.now = start + 5.25
            take(manager).succeed()
            held(2.5 + period + 0.375 - 5.25)  # the two of 2.5 age out 0.375 later
            clock.now = start + 5.5
            take(manager).succeed()
            held(2.0 + period + 2.5 - 5.5)  # the last no sooner than the 429's reset says
            # A 429 whose reset shows the window longer (its headers read as a bucket's: once
            # in the window, any 429 with numbers moves it) moves what the pool counts by as
            # much: the window is 4 s (and SLIDE_SLACK), not 3.
            clock.now = start + 2.0 + period + 2.5
            error = rate_limited("2s", organization="org-s", headers=BUCKET_HEADERS)
            take(manager).fail(dataclasses.replace(RATE_LIMITED, seconds=0.125), error)
            held(5.25 + period + 0.375 - clock.now + start)  # (held as counted)
            clock.now = start + 5.25 + period + 0.375
            take(manager).succeed()
            held(5.25 + 4.0 * (1 + SLIDE_SLACK) - clock.now + start)  # the call of 5.25


def _sliding_call(
    manager: KeyManager, clock: FakeClock, left: int, latency: float = 2**-6
) -> None:
    """A call on ``manager``'s one key whose answer, ``latency`` later, shows ``left`` of a
    sliding window's 4 requests, its newest aging out in a second."""
    context = contextvars.copy_context()
    taken = context.run(take, manager)
    marks = context.run(taken.owner.sending, taken.state, 0.0)
    clock.now += latency
    context.run(taken.owner.answered, taken.state, ServerBudget(
        requests_limit=4, requests_left=left, requests_reset=1.0), marks)
    context.run(taken.succeed)


def test_a_sliding_windows_requests_come_back_one_at_a_time_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """A sliding window of 4 a second: four calls an eighth of a second apart, each answered
    1/64 s later.  Spent, the pool is back when the first stops counting (a second after its
    answer), not when the last does; the call that goes then holds it until the second
    does — in both stores; after a 429, the pool waits for the reset.  And A and B leave
    1/128 s apart, the server counts B first and A's answer comes first: B's, showing 1
    left, lets no call go into the full window.  And a request that stopped counting well
    before the next one left (more than OVERTAKE) is not given back, though its answer's
    reset, stamped from when that slow answer came, is later: others fill the window
    unseen."""
    clock = FakeClock()
    for case in ("in turn", "overtaken", "unseen"):
        (a,) = made_up_keys(1, f"slide{case[0]}")
        memory, shared = _on_one_clock([Key(a, pool="slide")], clock, redis_server)
        start = clock.now = 1000.0
        try:
            for manager in (memory, shared):
                clock.now = start
                if case == "in turn":
                    for n in range(4):
                        clock.now = start + n / 8
                        _sliding_call(manager, clock, 3 - n)
                    with pytest.raises(AllKeysCoolingError) as info:
                        take(manager)
                    assert clock.now + info.value.retry_after == pytest.approx(
                        start + 1 + 2**-6), manager.backend  # (not start + 3/8 + 1 + 2**-6)
                    clock.now = start + 1 + 2**-6
                    context = contextvars.copy_context()
                    taken = context.run(take, manager)
                    marks = context.run(taken.owner.sending, taken.state, 0.0)
                    second = start + 1 / 8 + 1 + 2**-6  # (when the second stops counting)
                    for answer in (True, False):  # when it leaves, and when its answer
                        with pytest.raises(AllKeysCoolingError) as info:  # shows 0 left
                            take(manager)
                        assert clock.now + info.value.retry_after == pytest.approx(
                            second), manager.backend
                        if answer:
                            clock.now += 2**-6
                            context.run(taken.owner.answered, taken.state, ServerBudget(
                                requests_limit=4, requests_left=0, requests_reset=1.0), marks)
                            context.run(taken.succeed)
                    # A call then meets a 429: when the others come back is forgotten, and
                    # the pool waits for the reset of the freshest answer.
                    clock.now = second
                    context = contextvars.copy_context()
                    taken = context.run(take, manager)
                    context.run(taken.owner.sending, taken.state, 0.0)
                    context.run(taken.fail, dataclasses.replace(RATE_LIMITED, seconds=2**-4),
                                rate_limited("62ms", organization="org-slide",
                                             numbers="Limit 4, Used 4, Requested 1"))
                    clock.now = start + 2 / 8 + 1 + 2**-6
                    take(manager)
                    with pytest.raises(AllKeysCoolingError) as info:
                        take(manager)
                    assert clock.now + info.value.retry_after == pytest.approx(
                        start + 1 + 2**-5 + 1), manager.backend  # (not 3 / 8 + 1 + 2**-6)
                elif case == "unseen":
                    # Its one call's request stopped counting at start + 1 (its answer came
                    # 1/8 s later); the next leaves 1/16 s after that and shows 0 left: others
                    # fill the window unseen, and nothing comes back before its reset.
                    _sliding_call(manager, clock, 3, latency=2**-3)
                    clock.now = start + 1 + 2**-4
                    _sliding_call(manager, clock, 0)
                    with pytest.raises(AllKeysCoolingError) as info:
                        take(manager)
                    assert clock.now + info.value.retry_after == pytest.approx(
                        start + 1 + 2**-4 + 2**-6 + 1), manager.backend
                else:
                    for n in range(2):
                        clock.now = start + n / 8
                        _sliding_call(manager, clock, 3 - n)
                    clock.now = start + 1 / 4
                    first, second = (contextvars.copy_context() for _ in range(2))
                    calls = []
                    for context in (first, second):
                        taken = context.run(take, manager)
                        calls.append((taken, context.run(taken.owner.sending, taken.state, 0.0)))
                        clock.now += 2**-7
                    for (taken, marks), context, left in zip(calls, (first, second), (0, 1)):
                        clock.now += 2**-6
                        context.run(taken.owner.answered, taken.state, ServerBudget(
                            requests_limit=4, requests_left=left, requests_reset=1.0), marks)
                        context.run(taken.succeed)
                    with pytest.raises(AllKeysCoolingError) as info:
                        take(manager)
                    assert clock.now + info.value.retry_after == pytest.approx(
                        start + 1 / 8 + 1 + 2**-6), manager.backend
        finally:
            memory.close()
            shared.close()


def test_a_key_held_for_its_old_pools_spent_budget_is_freed_by_its_new_pools_answer(
    redis_server: RedisServer,
) -> None:
    """Key a's own pool spends its request budget (an answer: 0 left, reset in 12 s): a is
    held.  A 429 of another call on a names org-x, which b joined already: a joins it, still
    held.  An answer in org-x then shows budget left: its members held only for a spent
    budget are ready — a too, in both stores.  (Redis kept a held for 12 s: a pool frees its
    members only if it held them itself, and org-x never had.  Found by the lockstep run's
    windows flavour while it still had budget answers: seed 71.)"""
    clock = FakeClock()
    a, b = made_up_keys(2, "heldmove")
    memory, shared = _on_one_clock([a, b], clock, redis_server)
    try:
        for manager in (memory, shared):
            state_b = cast(KeyState, manager._ring.find(b))
            calls = [contextvars.copy_context() for _ in range(4)]
            first = calls[0].run(take, manager, {state_b})
            second = calls[1].run(take, manager, {state_b})
            assert first.key == second.key == a, manager.backend
            mark = calls[0].run(first.owner.sending, first.state, 0.0)
            calls[0].run(first.owner.answered, first.state, ServerBudget(
                requests_limit=10, requests_left=0, requests_reset=12.0), mark)
            calls[0].run(first.succeed)
            other = calls[2].run(take, manager)
            assert other.key == b, manager.backend
            error = rate_limited("2s", organization="org-x", numbers="no numbers")
            calls[2].run(other.fail, dataclasses.replace(RATE_LIMITED, seconds=0.5), error)
            calls[1].run(second.fail, dataclasses.replace(RATE_LIMITED, seconds=0.5), error)
            assert rows(manager)[masked(a)]["reason"] == "budget spent (RPM)", manager.backend
            clock.now += 1.0
            last = calls[3].run(take, manager)
            assert last.key == b, manager.backend
            mark = calls[3].run(last.owner.sending, last.state, 0.0)
            calls[3].run(last.owner.answered, last.state, ServerBudget(
                requests_limit=10, requests_left=5, requests_reset=1.0), mark)
            calls[3].run(last.succeed)
            assert rows(manager)[masked(a)]["state"] == "ready", manager.backend
    finally:
        memory.close()
        shared.close()


def test_a_long_requests_late_answer_counts_where_its_request_left_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """A request that generates for 3 s was counted when it arrived (bucket empty, full
    again in 1 s); one that left 2.9 s later was answered first (2 left).  The long one's
    answer is the older count: stamped from when each request left, its reset (1.0) is
    earlier than the short one's (2.9 + 0.8), and it does not hold the pool — in both
    stores.  (Stamped on arrival, 3.0 + 1.0, it was the later one: the pool was held until
    then.)"""
    with _team_of_two(redis_server, "long") as (clock, managers, (a, b)):
        start = clock.now
        for manager in managers:
            clock.now = start
            long, short = contextvars.copy_context(), contextvars.copy_context()

            def sent(manager: KeyManager = manager) -> tuple[Lease, Any]:
                taken = take(manager)
                return taken, taken.owner.sending(taken.state, 0.0)

            first, first_mark = long.run(sent)
            clock.now = start + 2.9
            second, second_mark = short.run(sent)
            clock.now = start + 2.92
            short.run(second.owner.answered, second.state, ServerBudget(
                requests_limit=10, requests_left=2, requests_reset=0.8), second_mark)
            short.run(second.succeed)
            clock.now = start + 3.0
            long.run(first.owner.answered, first.state, ServerBudget(
                requests_limit=10, requests_left=0, requests_reset=1.0), first_mark)
            long.run(first.succeed)
            assert {row["state"] for row in rows(manager).values()} == {"ready"}, manager.backend
            assert take(manager).key in (a, b)


@pytest.mark.parametrize("late", ["first request", "further request"])
def test_an_answer_is_placed_by_when_its_request_left_not_when_its_call_chose(
    late: str, redis_server: RedisServer,
) -> None:
    """Call A's request leaves 0.5 s after A chose its key (its client was built, or — a
    further request — it waited in the hook); call B chooses and sends at 0.5 s, after it.
    The server counts A after B (A's reset is later); B's answer comes first.  Both stores
    take in A's answer — its budget is spent — placed from when A's request left, not from
    when A chose (Redis placed it there, 0.5 s earlier, and dropped it: the pool stayed
    ready)."""
    with _team_of_two(redis_server, f"leftat{late[0]}") as (clock, managers, _):
        start = clock.now
        for manager in managers:
            clock.now = start
            mine, theirs = contextvars.copy_context(), contextvars.copy_context()
            first = mine.run(take, manager)
            if late == "further request":
                mark = mine.run(first.owner.sending, first.state, 0.0)
                mine.run(first.owner.answered, first.state, None, mark)
                mine.run(first.owner.before_sending, first.state)
            clock.now = start + 0.5
            first_mark = mine.run(first.owner.sending, first.state, 0.0)
            second = theirs.run(take, manager)
            second_mark = theirs.run(second.owner.sending, second.state, 0.0)
            clock.now = start + 0.5 + 2**-6
            theirs.run(second.owner.answered, second.state, ServerBudget(
                requests_limit=10, requests_left=3, requests_reset=1.0), second_mark)
            theirs.run(second.succeed)
            clock.now = start + 0.5 + 2**-5
            mine.run(first.owner.answered, first.state, ServerBudget(
                requests_limit=10, requests_left=0, requests_reset=1.25), first_mark)
            mine.run(first.succeed)
            assert {row["reason"] for row in rows(manager).values()} == {
                "budget spent (RPM)"}, manager.backend


@pytest.mark.parametrize("seed", [*range(40), 87, 107, 109, 153, 165, 187, 189, 212, 216])
def test_both_stores_agree_step_by_step(seed: int, redis_server: RedisServer) -> None:
    _lockstep(seed, redis_server)


@pytest.mark.parametrize("seed", [*range(20), 73, 127, 240, 397, 648])  # (these reach windows)
def test_both_stores_agree_step_by_step_on_a_server_that_counts_in_windows(
    seed: int, redis_server: RedisServer,
) -> None:
    """The run above, but every call names no model (its pool is not MIXED), no answer's
    headers tell a budget, and every 429 with numbers is a fixed window's (org-b's, with
    headers that make them a window's end and size): pools learn the server's windows, are
    allowed per window, meet 429s in them and fall off them."""
    _lockstep(seed, redis_server, windows=True)


@pytest.mark.parametrize("seed", [*range(20), 25, 30, 33])  # (30, 33: shared; 25: longer)
def test_both_stores_agree_step_by_step_on_a_server_that_counts_in_a_sliding_window(
    seed: int, redis_server: RedisServer,
) -> None:
    """The run above, but org-b's 429s with numbers are a sliding window's, or (a third of
    them) a bucket's: pools keep to the window, count their calls in it, meet 429s there (any
    with numbers then moves the window) and leave it (a 429 without)."""
    _lockstep(seed, redis_server, windows=True, sliding=True)


def _lockstep(
    seed: int, redis_server: RedisServer, windows: bool = False, sliding: bool = False,
) -> None:
    """Random runs of what calls do — take a key (some to avoid; its pool probed, as when its
    pooled client is made; its request of some tokens leaving, and further requests of the
    same call spending the pool's budget), end it with a budget of
    requests and tokens from the headers, an answer with none, a 429 (with or without an
    organization), a 500, a 401, a 400, abandon it, its tokens corrected by the answer's
    usage or not; set_ttl; give a disabled key again; let time pass — applied to a memory
    manager and a Redis manager on one fake clock.  After every step both must have handed
    out the same key (or raised the same error with the same reasons and wait) and show the
    same stats().  Every time is a sum of powers of two, exact in a double and in the JSON
    Redis stores (14 digits): equal deadlines are equal in both stores.  (So is the token
    pacing of the key given ``tpm``: 128 tokens a second, calls of 128 or 256 tokens.  In
    half the runs the answers are a refilling bucket's, whose deadlines are not: there, the
    waits agree to the millisecond.)"""
    import random

    rng = random.Random(seed)
    aside = random.Random(-1 - seed)
    # In half the runs the answers' resets are a refilling bucket's, of 4 a second: pools
    # learn its rate and are paced by it (its own stream: the runs' other draws unchanged).
    bucket = random.Random(f"bucket {seed}")
    bucketed = bucket.random() < 0.5
    clock = FakeClock()
    keys = made_up_keys(5, f"lockstep{seed}")
    spec: list[str | Key] = [
        Key(keys[0], pool="team"), Key(keys[1], pool="team"), Key(keys[2], tpm=128 * 60),
        *keys[3:],
    ]
    memory, shared = _on_one_clock(spec, clock, redis_server)
    held: list[tuple[Lease, Lease, Any, Any, contextvars.Context, contextvars.Context, float]] = []
    trace: list[str] = []
    try:
        for step in range(120):
            op = rng.choice(["take", "take", "take", "end", "end", "end", "time", "ttl",
                             "again", "more"])
            where = f"seed {seed} step {step} ({op}); before: " + "; ".join(trace[-30:])
            if op == "take":
                avoid = set(rng.sample(keys, rng.choice([0, 0, 0, 1, 2])))
                # Each call runs in a context of its own, as in a thread or a task of its own.
                mine, context = contextvars.copy_context(), contextvars.copy_context()
                one, two = mine.run(_outcome, memory, avoid), context.run(_outcome, shared, avoid)
                trace.append(f"take avoiding {sorted(keys.index(k) for k in avoid)}: "
                             f"{keys.index(one[1]) if one[0] == 'key' else one}")
                assert one[:2] == two[:2], f"{where}; memory {one[:2]}, Redis {two[:2]}"
                if one[0] != "key":
                    # (Waits to the millisecond: a refilling bucket's deadlines are no sums of
                    # powers of two, and Redis keeps a deadline to 14 digits.)
                    assert one[1] == two[1] and all(
                        x == y or abs(x - y) <= 0.0011 for x, y in zip(one[2:], two[2:])
                    ), f"{where}; memory {one}, Redis {two}"
                elif not windows:  # the models a 429 held in the key's pool, in both
                    for model in ("gpt-4o-mini", "gpt-4o"):
                        holds = [round(taken.owner.lane_held(taken.state, model), 6)
                                 for taken in (one[2], two[2])]
                        assert holds[0] == holds[1], f"{where}; {model} held {holds}"
                if one[0] == "key":
                    if rng.random() < 0.3:  # its pooled client is made now: probe its pool
                        trace[-1] += " (probing)"
                        mine.run(one[2].owner.probing, one[2].state)
                        context.run(two[2].owner.probing, two[2].state)
                    tokens = float(rng.choice([0, 128, 256]))
                    trace[-1] += f" {tokens:g} tokens"
                    marks = (mine.run(one[2].owner.sending, one[2].state, tokens),
                             context.run(two[2].owner.sending, two[2].state, tokens))
                    held.append((one[2], two[2], *marks, mine, context, tokens))
            elif op == "end" and held:
                one, two, mark_one, mark_two, mine, context, tokens = held.pop(
                    rng.randrange(len(held)))
                how = rng.choice(["plain", "bare", "verdict", "verdict", "abandon"] if windows
                                 else ["budget", "budget", "plain", "bare", "verdict", "abandon"])
                trace.append(f"end {keys.index(one.key)}: {how}")
                if tokens and rng.random() < 0.5:  # the answer's usage says what it cost
                    actual = float(rng.choice([128, 256]))
                    trace[-1] += f" cost {actual:g}"
                    mine.run(one.owner.corrected, one.state, tokens, actual)
                    context.run(two.owner.corrected, two.state, tokens, actual)
                if how == "budget":
                    budget = ServerBudget(requests_limit=10, requests_left=rng.randrange(0, 4),
                                          requests_reset=float(rng.choice([0.5, 3.0, 12.0])))
                    if bucketed:  # (from what it counted, a little refilled or not)
                        budget = dataclasses.replace(budget, requests_reset=(
                            0.25 * (10 - cast(int, budget.requests_left))
                            - bucket.choice([0.0, 0.125])))
                    if rng.random() < 0.5:
                        budget = dataclasses.replace(
                            budget, tokens_limit=2048, tokens_left=rng.choice([0, 256, 1024]),
                            tokens_reset=float(rng.choice([0.5, 3.0, 12.0])))
                    trace[-1] += (f" left {budget.requests_left} reset {budget.requests_reset}"
                                  f" tokens {budget.tokens_left} reset {budget.tokens_reset}")
                if how in ("budget", "plain", "bare"):
                    # The model the call asked for, when its driver knows it (a pooled
                    # client's hook knows it from the request: its answer is of that model).
                    one.model = two.model = (
                        None if windows else rng.choice([None, None, "gpt-4o-mini", "gpt-4o"]))
                    trace[-1] += f" {one.model}"
                if how == "budget":
                    mine.run(one.owner.answered, one.state, budget, mark_one, one.model)
                    context.run(two.owner.answered, two.state, budget, mark_two, two.model)
                if how == "plain":  # an answer, its headers not read (no pooled client)
                    mine.run(one.owner.answered, one.state, None, mark_one)
                    context.run(two.owner.answered, two.state, None, mark_two)
                if how == "bare":  # an answer whose headers say nothing of the budget
                    mine.run(one.owner.answered, one.state, ServerBudget(), mark_one, one.model)
                    context.run(two.owner.answered, two.state, ServerBudget(), mark_two,
                                two.model)
                if how in ("budget", "plain", "bare"):
                    mine.run(one.succeed)
                    context.run(two.succeed)
                elif how == "verdict":
                    verdict = _verdicts(rng)
                    if windows and rng.random() < 0.5:  # (mostly 429s that tell an end)
                        verdict = dataclasses.replace(
                            RATE_LIMITED, seconds=float(rng.choice([0.5, 1.0, 2.0])))
                    error = None
                    if verdict.cause is Cause.RATE_LIMITED and (windows or rng.random() < 0.5):
                        organization = "org-b" if windows else rng.choice(["org-a", "org-b"])
                        numbers = ("Limit 3, Used 3, Requested 1" if windows else
                                   rng.choice(["Limit 3, Used 3, Requested 1", "no numbers"]))
                        error = rate_limited(  # with numbers that give a rate, or none —
                            "2s", organization=organization, numbers=numbers,
                            model="gpt-4o-mini" if windows else rng.choice(
                                ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]),
                            # or, from org-b, headers that make them a window's end and size
                            # (or a sliding window's, or a bucket's)
                            headers=None if organization != "org-b" else WINDOW_HEADERS
                            if not sliding else aside.choice(
                                [SLIDING_HEADERS, SLIDING_HEADERS, BUCKET_HEADERS]))
                    # The model the call asked for, when its driver knows it.
                    one.model = two.model = (
                        None if windows else rng.choice([None, "gpt-4o-mini", "gpt-4o"]))
                    trace[-1] += (f" {verdict.reason} {verdict.seconds} {error is not None}"
                                  f" {one.model}")
                    mine.run(one.owner.answered, one.state, None, mark_one)  # an answer too
                    context.run(two.owner.answered, two.state, None, mark_two)
                    mine.run(one.fail, verdict, error)
                    context.run(two.fail, verdict, error)
                else:
                    mine.run(one.abandon)
                    context.run(two.abandon)
            elif op == "more" and held:
                # The call's request is answered (its headers not read: a store learns from
                # them when the call ends), and the call sends another: it spends budget.
                index = rng.randrange(len(held))
                one, two, mark_one, mark_two, mine, context, tokens = held[index]
                trace.append(f"another request on {keys.index(one.key)}")
                # (Its answer's headers, from a pooled client, may tell its model's budget,
                # in a pool serving several models — each store learns a pool's own budget
                # from a call's last answer, memory when it arrives, Redis at the call's
                # report: not comparable step by step. Drawn apart, so that the runs of the
                # seeds above stay as they were.)
                said, asked = None, None
                if (not windows and one.state.pool.pace_model == MIXED
                        and aside.random() < 0.5):
                    asked = aside.choice(["gpt-4o-mini", "gpt-4o"])
                    said = ServerBudget(requests_limit=aside.choice([2, 10]),
                                        requests_left=aside.randrange(0, 2),
                                        requests_reset=float(aside.choice([0.5, 4.0])))
                    trace[-1] += f" answered {asked} {said.requests_left} {said.requests_reset}"
                mine.run(one.owner.answered, one.state, said, mark_one, asked)
                context.run(two.owner.answered, two.state, said, mark_two, asked)
                mine.run(one.owner.before_sending, one.state)
                context.run(two.owner.before_sending, two.state)
                marks = (mine.run(one.owner.sending, one.state, tokens),
                         context.run(two.owner.sending, two.state, tokens))
                held[index] = (one, two, *marks, mine, context, tokens)
            elif op == "time":
                clock.now += rng.choice([0.25, 1.0, 3.0, 10.0])
                trace.append(f"now {clock.now - 1000:g}")
            elif op == "ttl":
                key, ttl = rng.choice(keys), float(rng.choice([0, 0, 5, 40]))
                trace.append(f"set_ttl {keys.index(key)} {ttl}")
                assert memory.set_ttl(key, ttl) == shared.set_ttl(key, ttl), where
            elif op == "again":
                key = rng.choice(keys)
                trace.append(f"add_keys {keys.index(key)}")
                assert memory.add_keys([key]) == shared.add_keys([key]) == 0, where
            seen_one, seen_two = rows(memory), rows(shared)
            for row in (*seen_one.values(), *seen_two.values()):
                if str(row["pool"]).startswith("own"):
                    row["pool"] = "own"
            differ = {k: (seen_one.get(k), seen_two.get(k)) for k in seen_one
                      if seen_one.get(k) != seen_two.get(k)}
            assert seen_one == seen_two, (
                f"{where}; then: {trace[-1] if trace else None}; memory, Redis: {differ}")
    finally:
        for one, two, _, _, mine, context, _ in held:
            mine.run(one.abandon)
            context.run(two.abandon)
        memory.close()
        shared.close()


def _on(manager: KeyManager, key: str, model: str | None = None) -> Lease:
    """A lease on ``key`` (every other key of ``manager`` avoided), for a call of ``model``."""
    taken = take(manager, {state for state in manager._ring if state.key != key})
    assert taken.key == key
    taken.model = model
    return taken


def test_a_model_held_in_one_pool_goes_one_call_at_a_time_in_another_until_it_learns_it(
    redis_server: RedisServer,
) -> None:
    """A 429 of gpt-4o in pool one (serving two models): pool two, which has no pace for
    gpt-4o yet, lets one gpt-4o call go per PROBE_WAIT — its limit may be as low, and a
    call at a time there meets one 429, not a volley (found by a trace of the two-model
    benchmark in ``api_key`` mode: four 429s on one key within 6 ms) — and gpt-4o-mini
    goes unheld; in both stores, and another process sharing the store holds it too."""
    pytest.importorskip("redis", reason='needs redis-py: pip install "stable-openai[redis]"')
    from stable_openai.backends import RedisBackend

    with _team_of_two(redis_server, "lanedprobe", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        spec = [Key(a, pool="one"), Key(b, pool="two")]
        namespace = cast(RedisBackend, shared.backend).namespace
        other = KeyManager.create(spec, clock=clock, backend=RedisBackend(
            redis_server.url, namespace=namespace, clock=clock, lease_seconds=1e6))
        try:
            for manager in (memory, shared):
                for model in ("gpt-4o-mini", "gpt-4o"):
                    taken = _on(manager, a)
                    taken.model = model
                    taken.succeed()
                taken = _on(manager, b)
                assert taken.owner.lane_held(taken.state, "gpt-4o") == 0  # no 429 yet: unheld
                taken.give_back()
                taken = _on(manager, a)
                taken.model = "gpt-4o"
                taken.fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                           rate_limited("30s", model="gpt-4o",
                                        numbers="Limit 2, Used 2, Requested 1"))
                taken = _on(manager, b)
                assert taken.owner.lane_held(taken.state, "gpt-4o") == 0  # one goes ...
                taken.give_back()
                taken = _on(manager, b)
                held = taken.owner.lane_held(taken.state, "gpt-4o")
                assert held == pytest.approx(PROBE_WAIT), manager.backend  # ... the next waits
                assert taken.owner.lane_held(taken.state, "gpt-4o-mini") == 0
                taken.give_back()
            seen = _on(other, b)  # (its choice brings the hold the shared record has)
            assert seen.owner.lane_held(seen.state, "gpt-4o") == pytest.approx(PROBE_WAIT)
            seen.give_back()
            clock.now += PROBE_WAIT
            for manager in (memory, shared):
                taken = _on(manager, b)
                assert taken.owner.lane_held(taken.state, "gpt-4o") == 0, manager.backend
                taken.give_back()
        finally:
            other.close()


def test_a_429_in_a_pool_serving_one_model_makes_the_pools_that_serve_two_probe_it(
    redis_server: RedisServer,
) -> None:
    """Pool one's calls so far asked for gpt-4o only: its 429 of gpt-4o cools its keys (the
    pool's budget is gpt-4o's) — and pool two, which serves two models and has no pace for
    gpt-4o, lets one gpt-4o call go per PROBE_WAIT, in both stores (found by a trace of the
    two-model benchmark: the run's first 429 was in such a pool, and told no other)."""
    with _team_of_two(redis_server, "singleprobe", ("one", "two")) as (
        _, (memory, shared), (a, b)
    ):
        for manager in (memory, shared):
            for key, model in ((a, "gpt-4o"), (b, "gpt-4o-mini"), (b, "gpt-4o")):
                _on(manager, key, model).succeed()
            _on(manager, a, "gpt-4o").fail(
                dataclasses.replace(RATE_LIMITED, seconds=30.0),
                rate_limited("30s", model="gpt-4o", numbers="Limit 2, Used 2, Requested 1"))
            assert rows(manager)[masked(a)]["state"] == "cooling"
            for held in (0.0, PROBE_WAIT):
                taken = _on(manager, b, "gpt-4o")
                assert taken.owner.lane_held(taken.state, "gpt-4o") == pytest.approx(held), (
                    manager.backend)
                taken.give_back()


def test_pools_serving_one_model_probe_it_after_a_429_until_they_learn_its_limit(
    redis_server: RedisServer,
) -> None:
    """Four pools whose calls asked for gpt-4o-mini only; c's answer told its budget in
    headers.  A 429 of gpt-4o-mini on a: b, which knows nothing of its limit yet, lets one
    call go per PROBE_WAIT (found by traces of OpenAI's default and of sliding windows in
    ``api_key`` mode: 20-25 429s a run, a volley on each key in turn); c is paced by its
    headers and d by the 429 it met itself, not probed; after PROBE_FOR seconds with no
    429, b goes unheld too — in both stores."""
    clock = FakeClock()
    a, b, c, d = made_up_keys(4, "oneprobe")
    memory, shared = _on_one_clock(
        [Key(a, pool="one"), Key(b, pool="two"), Key(c, pool="three"), Key(d, pool="four")],
        clock, redis_server)
    mini = "gpt-4o-mini"

    def holds(manager: KeyManager, key: str) -> tuple[float, float]:
        taken = _on(manager, key, mini)
        twice = (taken.owner.lane_held(taken.state, mini),
                 taken.owner.lane_held(taken.state, mini))
        taken.give_back()
        return twice

    try:
        for manager in (memory, shared):
            for key in (a, b, d):
                _on(manager, key, mini).succeed()
            told = _on(manager, c, mini)
            budget = ServerBudget(requests_limit=10, requests_left=5, requests_reset=1.0)
            told.owner.answered(told.state, budget, None, mini)
            told.succeed()
            _on(manager, d, mini).fail(dataclasses.replace(RATE_LIMITED, seconds=1.0),
                                rate_limited("1s", model=mini))
        clock.now += 1.0  # (d's cooldown is over)
        for manager in (memory, shared):
            _on(manager, a, mini).fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                                rate_limited("30s", model=mini))
            assert holds(manager, b) == (0.0, pytest.approx(PROBE_WAIT)), manager.backend
            assert holds(manager, c) == (0.0, 0.0), manager.backend
            assert holds(manager, d) == (0.0, 0.0), manager.backend
        clock.now += PROBE_FOR
        for manager in (memory, shared):
            assert holds(manager, b) == (0.0, 0.0), manager.backend
    finally:
        memory.close()
        shared.close()


def test_a_pools_probes_of_a_model_end_after_allowance_probes_in_both_stores(
    redis_server: RedisServer,
) -> None:
    """After a 429 of gpt-4o in pool one, pool two (serving two models, no pace for
    gpt-4o) is asked 120 times, 15.625 ms apart, whether a gpt-4o call may go: one in four
    goes (PROBE_WAIT is 50 ms) until ALLOWANCE_PROBES have, then every one — 60 in each
    store (found by a review: a Redis store that never counted its probes, or let one
    more through, passed every test)."""
    with _team_of_two(redis_server, "probecap", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        passed = {}
        for manager in (memory, shared):
            one, two = manager._ring.find(a), manager._ring.find(b)
            assert one is not None and two is not None
            for key, other, model in ((a, two, "gpt-4o-mini"), (a, two, "gpt-4o"),
                                      (b, one, "gpt-4o-mini"), (b, one, "gpt-4o")):
                taken = take(manager, {other})
                assert taken.key == key
                taken.model = model
                taken.succeed()
            taken = take(manager, {two})
            taken.model = "gpt-4o"
            taken.fail(dataclasses.replace(RATE_LIMITED, seconds=2.0),
                       rate_limited("2s", model="gpt-4o", numbers="no numbers"))
            passed[manager.backend.shared] = 0
            for _ in range(120):
                taken = take(manager, {one})
                if taken.owner.lane_held(taken.state, "gpt-4o") == 0:
                    passed[manager.backend.shared] += 1
                taken.give_back()
                clock.now += 0.015625  # (a power of two: the same deadlines in both stores)
            clock.now -= 120 * 0.015625  # (the other store runs the same steps from here)
    assert passed == {False: ALLOWANCE_PROBES + 120 - 4 * ALLOWANCE_PROBES,
                      True: ALLOWANCE_PROBES + 120 - 4 * ALLOWANCE_PROBES}


def _a_429_names(manager: KeyManager, key: str, model: str) -> None:
    """A call of ``model`` on ``key`` meets a 429 that names it, with no numbers."""
    _on(manager, key, model).fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                                  rate_limited("30s", model=model, numbers="no numbers"))


def _both_served_then_a_429(manager: KeyManager, a: str, b: str) -> None:
    """Keys ``a`` and ``b`` (pools of their own) served gpt-4o-mini and gpt-4o; then a 429 of
    gpt-4o on ``a``."""
    for key, model in ((a, "gpt-4o-mini"), (a, "gpt-4o"), (b, "gpt-4o-mini"), (b, "gpt-4o")):
        _on(manager, key, model).succeed()
    _a_429_names(manager, a, "gpt-4o")


@pytest.mark.parametrize("now", [1000.0, 1.7e9], ids=["early", "a-real-clock"])
def test_a_pools_probes_of_a_model_wait_for_those_out_in_both_stores(
    redis_server: RedisServer, now: float,
) -> None:
    """After a 429 of gpt-4o in pool one, pool two (no pace for gpt-4o) lets a probe go
    only while fewer are out than came back, plus one — one at a time, then two once one
    came back, three once two did (as TCP's slow start); a probe given up counts as back,
    and one out over PROBE_FOR too; in both stores (found by a trace of the two-model benchmark in
    ``api_key`` mode: probes PROBE_WAIT apart, whose answers took longer on a busy machine,
    met two 429s on one key).  Also at a clock as late as Redis's own (found by a review: the
    stamp sent back was clamped to 1e9, matched no probe out, and each stayed out for
    PROBE_FOR)."""
    with _team_of_two(redis_server, "probeout", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        clock.now = now
        steps: dict[bool, list[float]] = {}
        soonest: dict[bool, float | None] = {}
        for manager in (memory, shared):
            _both_served_then_a_429(manager, a, b)
            held: list[float] = []
            steps[manager.backend.shared] = held
            start = clock.now

            def ask(manager: KeyManager = manager, held: list[float] = held, then: float = 0.0625
                    ) -> tuple[contextvars.Context, Lease]:
                """A call of gpt-4o on b, in a context of its own (a thread's, a task's),
                asks whether it may go; ``then`` seconds later (past PROBE_WAIT)."""
                context = contextvars.copy_context()
                taken = context.run(_on, manager, b)
                held.append(round(context.run(
                    taken.owner.lane_held, taken.state, "gpt-4o", lease=taken), 6))
                clock.now += then
                return context, taken

            first = ask()  # goes
            context, taken = ask(then=0.0)  # held while the first is out ...
            # ... and a call that every pool holds waits that long to ask again (not 0: the
            # Redis process's own view learns the hold; found by reading: a spin)
            soonest[manager.backend.shared] = manager._model_free_in(
                "gpt-4o", set(), taken.state)[1]
            clock.now += 0.0625
            context.run(taken.give_back)
            first[0].run(first[1].succeed)
            second = ask()  # one came back: goes ...
            third = ask()  # ... and another beside it
            context, taken = ask()  # two out, one back: held
            context.run(taken.give_back)
            second[0].run(second[1].give_back)  # (a call given up is back too)
            ask()  # two back, one out: goes, and stays out ...
            ask()  # ... and one more: three out, two back
            context, taken = ask()  # held
            context.run(taken.give_back)
            clock.now += PROBE_FOR
            _a_429_names(manager, a, "gpt-4o")  # (gpt-4o still limited)
            ask()  # those out over PROBE_FOR count as back: goes
            third[0].run(third[1].succeed)  # (long after: nothing left to take back)
            clock.now = start  # (the other store runs the same steps from here)
    assert steps[False] == steps[True] == [0, PROBE_WAIT, 0, 0, PROBE_WAIT, 0, 0, PROBE_WAIT, 0]
    assert soonest == {False: pytest.approx(PROBE_WAIT), True: pytest.approx(PROBE_WAIT)}


def test_a_probe_is_back_when_its_lease_ends_however_and_a_call_it_runs_is_not_held_by_it(
    redis_server: RedisServer,
) -> None:
    """The probe a call is rides on its lease: whichever way the lease ends — an answer, a
    failure, a call abandoned, a key given back — and in whatever thread or task, the probe
    is back, and the next call of the model goes; a call that a probe's own call runs (a
    decorated function calling another) is not held by that probe, nor counted out or
    back, in both stores (found by a review: the stamp was kept per thread or task, so a nested call
    waited PROBE_FOR for its own caller, and a lease ended elsewhere left its probe out)."""
    ends: dict[str, Callable[[Lease], None]] = {
        "succeed": Lease.succeed,
        "fail": lambda taken: taken.fail(Verdict(
            Fate.KEEP, Action.RAISE, reason="bad request (400)",
            cause=Cause.NOT_A_KEY_PROBLEM)),
        "abandon": Lease.abandon,
        "give_back": Lease.give_back,
    }
    with _team_of_two(redis_server, "probelease", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        for manager in (memory, shared):
            _both_served_then_a_429(manager, a, b)
            for name, end in ends.items():  # (a model of its own each: probes from none)
                model = f"model-{name}"
                _a_429_names(manager, a, model)
                context = contextvars.copy_context()
                taken = context.run(_on, manager, b)
                assert context.run(taken.owner.lane_held, taken.state, model,
                                   lease=taken) == 0, (name, manager.backend)
                assert taken.probe is not None
                clock.now += 0.0625  # (past PROBE_WAIT)
                other = contextvars.copy_context()
                waiting = other.run(_on, manager, b)
                assert other.run(waiting.owner.lane_held, waiting.state, model,
                                 lease=waiting) == pytest.approx(PROBE_WAIT)  # one is out
                end(taken)  # (here, not in the call's own context)
                assert taken.probe is None
                assert other.run(waiting.owner.lane_held, waiting.state, model,
                                 lease=waiting) == 0, (name, manager.backend)  # it is back
                other.run(waiting.give_back)
                clock.now += 0.0625
            context = contextvars.copy_context()
            outer = context.run(_on, manager, b)
            assert context.run(outer.owner.lane_held, outer.state, "gpt-4o", lease=outer) == 0
            clock.now += 0.0625
            inner = context.run(_on, manager, b)  # (a call the first one runs)
            assert context.run(inner.owner.lane_held, inner.state, "gpt-4o", lease=inner) == 0
            assert inner.probe is None, manager.backend  # not counted out ...
            clock.now += 0.0625
            apart = contextvars.Context()  # (another thread's call)
            taken = apart.run(_on, manager, b)
            assert apart.run(taken.owner.lane_held, taken.state, "gpt-4o", lease=taken) == (
                pytest.approx(PROBE_WAIT)), manager.backend  # ... nor counted back: held
            apart.run(taken.give_back)
            context.run(inner.succeed)
            context.run(outer.succeed)
            taken = apart.run(_on, manager, b)
            assert apart.run(taken.owner.lane_held, taken.state, "gpt-4o", lease=taken) == 0
            apart.run(taken.give_back)
            clock.now += 1.0


def test_a_decorated_call_that_runs_another_of_its_model_is_not_held_by_its_own_probe(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``@stable`` functions of gpt-4o while only pool two may serve it, unlearned there: a
    call whose function runs another (the inner waits for the outer's PROBE_WAIT hold, not
    for the probe it runs in), and a call whose function raises (its probe is back: the
    next call waits PROBE_WAIT, no more — also from a thread that runs an event loop), in both
    stores; the sleeps are the decorator's own, on the fake clock (found by reviews: the inner
    call waited PROBE_FOR for its own caller; on a loop, Redis heard the probe was back only
    after the next call had waited PROBE_FOR)."""
    from stable_openai import stable

    with _team_of_two(redis_server, "probenest", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            clock.now += seconds

        monkeypatch.setattr("stable_openai._decorator.time.sleep", sleep)
        for manager in (memory, shared):
            _both_served_then_a_429(manager, a, b)  # (and a cools: only b serves)

            @stable(manager=manager)
            def inner(model: str, api_key: str) -> str:
                return api_key

            @stable(manager=manager)
            def outer(model: str, api_key: str) -> str:
                return inner(model)

            @stable(manager=manager)
            def broken(model: str, api_key: str) -> str:
                raise ValueError("not the key's fault")

            slept.clear()
            assert outer("gpt-4o") == b
            assert 0 < sum(slept) < 2 * PROBE_WAIT, (slept, manager.backend)
            clock.now += 1.0
            _a_429_names(manager, a, "gpt-4.1")  # (a model of its own: probes from none)
            slept.clear()
            with pytest.raises(ValueError):
                broken("gpt-4.1")
            # (another thread's call: none of this one's calls)
            assert contextvars.Context().run(inner, "gpt-4.1") == b  # after PROBE_WAIT
            assert sum(slept) == pytest.approx(PROBE_WAIT), (slept, manager.backend)

            async def in_a_loop(model: str) -> None:  # (as a notebook's cell runs sync calls)
                with pytest.raises(ValueError):
                    broken(model)
                assert contextvars.Context().run(inner, model) == b

            clock.now += 1.0
            _a_429_names(manager, a, "gpt-4.5")
            slept.clear()
            asyncio.run(in_a_loop("gpt-4.5"))  # (the probe is back before the loop runs again)
            assert sum(slept) == pytest.approx(PROBE_WAIT), (slept, manager.backend)
            clock.now += 60.0  # (the other store from here)


def test_a_probe_is_back_in_the_pool_it_was_counted_in_when_its_key_moved_meanwhile() -> None:
    """A probe counted out in pool org-x, whose key an answer moves into org-x/p before the
    call ends: the probe comes back to org-x (whose next call goes), and a call it runs is
    exempt in org-x, not in org-x/p (found by a review: the probe went back to the key's new
    pool, and org-x held its model until PROBE_FOR)."""
    from stable_openai._manager import _probes_here

    clock = FakeClock()
    a, b, c, d = made_up_keys(4, "probemove")
    manager = KeyManager.create([a, b, c, d], clock=clock)
    try:
        states = {state.key: state for state in manager._ring}
        for key, name in ((b, "org-x"), (c, "org-x"), (d, "org-x/p")):
            manager._ring.join_pool(states[key], name)
        for key in (a, b, c, d):
            for model in ("gpt-4o-mini", "gpt-4o"):
                _on(manager, key, model).succeed()
        _a_429_names(manager, a, "gpt-4o")
        context = contextvars.copy_context()
        taken = context.run(_on, manager, b)
        assert context.run(taken.owner.lane_held, taken.state, "gpt-4o", lease=taken) == 0
        x, moved = states[c].pool, states[d].pool
        with manager._lock:  # (as an answer naming its project would)
            manager._ring.join_pool(states[b], "org-x/p")
        assert states[b].pool is moved
        assert context.run(_probes_here, "gpt-4o") == [x]
        clock.now += 0.0625  # (past PROBE_WAIT)
        waiting = _on(manager, c)
        assert waiting.owner.lane_held(waiting.state, "gpt-4o", lease=waiting) == pytest.approx(
            PROBE_WAIT)  # b's probe is out in org-x
        context.run(taken.succeed)
        assert waiting.owner.lane_held(waiting.state, "gpt-4o", lease=waiting) == 0
        waiting.give_back()
    finally:
        manager.close()


def test_a_threads_context_keeps_no_lease_of_its_probes(redis_server: RedisServer) -> None:
    """A call that went as a probe and ended leaves nothing in its thread's context that
    keeps its lease (nor, through it, the manager) alive, in both stores (found by a
    review: the context held every probe's lease until the thread's next probe)."""
    import gc
    import weakref

    with _team_of_two(redis_server, "probegone", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        for manager in (memory, shared):
            _both_served_then_a_429(manager, a, b)
            context = contextvars.copy_context()
            taken = context.run(_on, manager, b)
            assert context.run(taken.owner.lane_held, taken.state, "gpt-4o", lease=taken) == 0
            assert taken.probe is not None, manager.backend
            context.run(taken.succeed)
            gone = weakref.ref(taken)
            del taken
            gc.collect()
            assert gone() is None, manager.backend
            clock.now += 60.0  # (the other store from here)


def test_a_models_calls_spread_over_the_keys_in_both_stores(redis_server: RedisServer) -> None:
    """Calls that name their model prefer a key with none of that model's calls in flight
    from this process, over a less loaded or less recently used one that has one: a gpt-4o
    call, three gpt-3.5-turbo calls, then three more gpt-4o calls take four keys, one gpt-4o
    call each (by load and use alone the second gpt-4o call took the first's key: found by
    a trace of the two-model benchmark in ``api_key`` mode, where three gpt-4o calls on one
    key met its limit of two together); when every key has one, the least loaded goes
    first; and the counts end with the calls, in both stores."""
    from stable_openai._manager import lease, take_lease

    clock = FakeClock()
    keys = made_up_keys(4, "spread")
    memory, shared = _on_one_clock(keys, clock, redis_server)
    try:
        for manager in (memory, shared):

            def take_for(model: str, manager: KeyManager = manager) -> Lease:
                taken = take_lease(manager, None, model)
                return taken if taken is not None else lease(manager, None, 0.0, None, model)[0]

            first = take_for("gpt-4o")
            others = [take_for("gpt-3.5-turbo") for _ in range(3)]
            assert len({taken.key for taken in [first, *others]}) == 4, manager.backend
            fours = [first] + [take_for("gpt-4o") for _ in range(3)]
            assert len({taken.key for taken in fours}) == 4, manager.backend
            for taken in others[:2]:
                taken.succeed()
            fifth = take_for("gpt-4o")  # (every key has a gpt-4o call: one least loaded)
            assert fifth.key != others[2].key, manager.backend  # (it has two calls)
            for taken in (*fours, others[2], fifth):
                taken.succeed()
            assert manager._spread_calls == {}, manager.backend
    finally:
        memory.close()
        shared.close()


def test_a_decorated_call_of_a_model_takes_a_key_its_model_is_not_in_flight_on() -> None:
    """``@stable`` functions with a ``model`` argument: a gpt-4o call runs a gpt-3.5-turbo
    call on the other key, which runs a gpt-4o call — which takes the key with no gpt-4o
    call in flight (by use alone it took the first call's key, used longest ago)."""
    from stable_openai import stable

    a, b = made_up_keys(2, "spreaddec")
    manager = KeyManager.create([a, b])
    try:
        @stable(manager=manager)
        def inner(model: str, api_key: str) -> str:
            return api_key

        @stable(manager=manager)
        def middle(model: str, api_key: str) -> tuple[str, str]:
            return api_key, inner("gpt-4o")

        @stable(manager=manager)
        def outer(model: str, api_key: str) -> tuple[str, str, str]:
            return (api_key, *middle("gpt-3.5-turbo"))

        first, second, third = outer("gpt-4o")
        assert first != second  # (by load)
        assert third == second  # (by model)
        assert manager._spread_calls == {}
    finally:
        manager.close()


def test_a_pool_that_learned_its_models_limit_asks_no_store_about_probes(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process whose calls all ask for gpt-4o: after a 429 of gpt-4o in pool one, a call
    on pool two — whose headers told its budget — takes the lock-free path: no script runs
    in Redis (found by a review: every call after a process's first 429 ran one, 0.4 ms
    each, for good); pool three, which knows nothing of its limit yet, asks the store —
    until the store says its probes are spent (the process counts only its own)."""
    from stable_openai.backends import RedisBackend

    clock = FakeClock()
    a, b, c = made_up_keys(3, "fastprobe")
    memory, shared = _on_one_clock(
        [Key(a, pool="one"), Key(b, pool="two"), Key(c, pool="three")], clock, redis_server)
    asked: list[str] = []
    real = RedisBackend.lane_pass

    def counted(self: RedisBackend, state: KeyState, *args: Any) -> Any:
        asked.append(state.key)
        return real(self, state, *args)

    monkeypatch.setattr(RedisBackend, "lane_pass", counted)
    try:
        manager = shared
        _on(manager, a, "gpt-4o").succeed()
        _on(manager, c, "gpt-4o").succeed()
        told = _on(manager, b, "gpt-4o")
        budget = ServerBudget(requests_limit=10, requests_left=5, requests_reset=1.0)
        told.owner.answered(told.state, budget, None, "gpt-4o")
        told.succeed()
        _on(manager, a, "gpt-4o").fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                   rate_limited("30s", model="gpt-4o"))
        for key in (b, c):
            taken = _on(manager, key, "gpt-4o")
            assert taken.owner.lane_held(taken.state, "gpt-4o") == 0
            taken.give_back()
        assert asked == [c]
        for _ in range(ALLOWANCE_PROBES + 5):  # once the store says c's probes are spent,
            clock.now += 0.0625  # the process stops asking (steps past PROBE_WAIT, exact)
            taken = _on(manager, c, "gpt-4o")
            assert taken.owner.lane_held(taken.state, "gpt-4o") == 0
            taken.give_back()
        assert asked == [c] * ALLOWANCE_PROBES
    finally:
        memory.close()
        shared.close()


def test_a_pooled_clients_requests_held_by_a_probe_leave_one_per_probe_wait(
    redis_server: RedisServer,
) -> None:
    """A pooled client's call cannot move to another key once its request is about to
    leave: held, it waits and goes.  After a 429 of gpt-4o in pool one, eight gpt-4o calls
    on pool two (serving two models, no pace for gpt-4o), 5 ms apart: each books the next
    probe's place, so their requests leave PROBE_WAIT apart, in both stores (found by a
    review: all but the first left together when the hold ended, the volley probing is
    for)."""
    with _team_of_two(redis_server, "bookprobe", ("one", "two")) as (
        clock, (memory, shared), (a, b)
    ):
        for manager in (memory, shared):
            one, two = manager._ring.find(a), manager._ring.find(b)
            assert one is not None and two is not None
            for model in ("gpt-4o-mini", "gpt-4o"):
                taken = take(manager, {one})
                taken.model = model
                taken.succeed()
            taken = take(manager, {two})
            taken.model = "gpt-4o"
            taken.fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                       rate_limited("30s", model="gpt-4o"))
            start, leave = clock.now, []
            for _ in range(8):
                context = contextvars.copy_context()
                taken = context.run(take, manager, {one})
                wait = context.run(manager._before_sending, taken.state, "gpt-4o")
                leave.append(clock.now + wait - start)
                context.run(taken.give_back)
                clock.now += 0.005
            assert leave == pytest.approx([n * PROBE_WAIT for n in range(8)]), manager.backend
            clock.now = start  # (the other store runs the same steps from here)


def test_a_pool_another_process_taught_its_limit_is_not_probed(
    redis_server: RedisServer,
) -> None:
    """Two processes on one Redis store, keys of gpt-4o-mini only: the first meets a 429
    in pool four (which so learns its limit); the second, after a 429 of its own in pool
    one, asks whether a call may go on pool four: its own state knows nothing of four's
    429, the store does — not probed (found by a review: the store's 'met a 429' rule was
    untested, each process answering first from its own)."""
    from stable_openai.backends import RedisBackend

    clock = FakeClock()
    a, d = made_up_keys(2, "taughtprobe")
    spec = [Key(a, pool="one"), Key(d, pool="four")]
    namespace = f"taught-{uuid.uuid4().hex[:12]}"
    first, second = (
        KeyManager.create(spec, clock=clock, backend=RedisBackend(
            redis_server.url, namespace=namespace, clock=clock, lease_seconds=1e6))
        for _ in range(2))

    try:
        for manager in (first, second):
            for key in (a, d):
                _on(manager, key, "gpt-4o-mini").succeed()
        _on(first, d, "gpt-4o-mini").fail(dataclasses.replace(RATE_LIMITED, seconds=1.0),
                          rate_limited("1s", model="gpt-4o-mini"))
        clock.now += 1.0
        _on(second, a, "gpt-4o-mini").fail(dataclasses.replace(RATE_LIMITED, seconds=30.0),
                           rate_limited("30s", model="gpt-4o-mini"))
        taken = _on(second, d, "gpt-4o-mini")
        assert taken.owner.lane_held(taken.state, "gpt-4o-mini") == 0
        assert taken.owner.lane_held(taken.state, "gpt-4o-mini") == 0
        taken.give_back()
    finally:
        first.close()
        second.close()


def test_a_pooled_clients_requests_book_a_models_pace_but_not_past_the_longest_wait(
    redis_server: RedisServer,
) -> None:
    """A 429 of gpt-4o (one request per 2 s) in a pool serving two models holds gpt-4o for
    2 s, then paces it at 0.97 × that rate.  Pooled-client requests of gpt-4o, 5 ms apart:
    each books the next slot, so they leave a slot apart — until the slot is more than the
    hook's longest wait (30 s) away: such a request goes at once and books nothing, and the
    hold stays where the last booking left it, in both stores (found by a review: each
    booked a slot anyway, and 200 requests held gpt-4o for minutes)."""
    from stable_openai._manager import _LONGEST_REQUEST_WAIT

    clock = FakeClock()
    (a,) = made_up_keys(1, "bookpace")
    memory, shared = _on_one_clock([Key(a, pool="one")], clock, redis_server)
    slot = 2.0 / PACE_BACKOFF
    booked = math.floor((_LONGEST_REQUEST_WAIT - 2.0) / slot) + 1  # (5 ms apart: still so)
    try:
        for manager in (memory, shared):
            _two_models_then_a_429(manager, 2.0, "2s")
            start, leave = clock.now, []
            for _ in range(booked + 3):
                context = contextvars.copy_context()
                taken = context.run(take, manager)
                wait = context.run(manager._before_sending, taken.state, "gpt-4o")
                leave.append(clock.now + wait - start)
                context.run(taken.give_back)
                clock.now += 0.005
            expected = [2.0 + n * slot for n in range(booked)]
            expected += [clock.now - start - 0.005 * (3 - n) for n in range(3)]  # at once
            assert leave == pytest.approx(expected, abs=1e-6), manager.backend
            taken = take(manager)
            held = taken.owner.lane_held(taken.state, "gpt-4o")
            assert held == pytest.approx(2.0 + booked * slot - (clock.now - start), abs=1e-6)
            taken.give_back()
            clock.now = start  # (the other store runs the same steps from here)
    finally:
        memory.close()
        shared.close()


def test_an_answer_that_shows_a_models_budget_spent_makes_the_other_pools_probe_it(
    redis_server: RedisServer,
) -> None:
    """Two pools serving two models: an answer of gpt-4o in pool one whose headers show no
    request left of gpt-4o's limit holds gpt-4o there as a 429 would — and, as after a 429,
    pool two (no pace for gpt-4o) lets one gpt-4o call go per PROBE_WAIT, in both
    stores."""
    with _team_of_two(redis_server, "spentprobe", ("one", "two")) as (
        _, (memory, shared), (a, b)
    ):
        for manager in (memory, shared):
            for key in (a, b):
                for model in ("gpt-4o-mini", "gpt-4o"):
                    _on(manager, key, model).succeed()
            spent = _on(manager, a, "gpt-4o")
            budget = ServerBudget(requests_limit=10, requests_left=0, requests_reset=1.0)
            spent.owner.answered(spent.state, budget, None, "gpt-4o")
            spent.succeed()
            taken = _on(manager, b, "gpt-4o")
            assert taken.owner.lane_held(taken.state, "gpt-4o") == 0
            assert taken.owner.lane_held(taken.state, "gpt-4o") == pytest.approx(PROBE_WAIT), (
                manager.backend)
            taken.give_back()
