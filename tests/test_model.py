"""The budget rules alone: pure functions of a pool's budget, the time and its calls in flight,
returning what must happen to the pool's keys (tests/test_store_scenarios.py checks that the
memory ring and the Redis scripts apply them alike)."""

from __future__ import annotations

from typing import cast

import pytest

from stable_openai._budget import ServerBudget
from stable_openai._cause import Cause
from stable_openai._model import (
    ALLOWANCE_PROBES,
    BLIND_FIRST,
    FREED,
    MIXED,
    PACE_BACKOFF,
    PACE_DROP,
    PACE_GAIN,
    PERIOD_GAIN,
    PERIOD_SLACK,
    PROBE_CALLS,
    PROBE_WAIT,
    RESET_SLACK,
    SLIDE_MOST,
    SLIDE_SLACK,
    SLIDE_STRETCH,
    UNANSWERED_FOR,
    Budget,
    Spent,
)


def headers(left: int, reset: float, limit: int = 10) -> ServerBudget:
    return ServerBudget(requests_limit=limit, requests_left=left, requests_reset=reset)


def started(budget: Budget, now: float, in_flight: int) -> Spent | None:
    """A call starts on the pool and its request leaves at once; what the call's start
    decided (at most one budget is known in these tests)."""
    budget.sent += 1
    decisions = budget.spend_request(now, in_flight)
    budget.send(now)
    assert len(decisions) <= 1
    return decisions[0] if decisions else None


def test_an_unknown_budget_decides_nothing() -> None:
    budget = Budget()
    assert started(budget, 0.0, 1) is None
    assert budget.requests_left is None


def test_an_answer_tells_what_is_left_less_what_left_after_it() -> None:
    budget = Budget()
    assert started(budget, 0.0, 1) is None  # mark 1
    assert started(budget, 0.0, 2) is None  # mark 2, still unanswered
    budget.answered(1)
    assert budget.learn(headers(left=3, reset=10.0), mark=1, now=1.0) == [FREED]
    assert budget.requests_left == 2  # the server counted call 1; call 2 left after it
    assert started(budget, 1.0, 2) is None
    assert started(budget, 1.0, 3) == Spent(11.0, "budget spent (RPM)", Cause.REQUESTS_SPENT)


def test_a_spent_budget_with_no_known_reset_waits_for_an_answer() -> None:
    budget = Budget()
    budget.probe(keys=1, in_flight=0)
    assert budget.probing and budget.requests_left == PROBE_CALLS
    assert started(budget, 5.0, 1) is None
    decision = started(budget, 5.0, 2)
    assert decision is not None and decision.until == 5.0 + PROBE_WAIT


def _call(
    budget: Budget, at: float, answered: float, left: int, limit: int = 10
) -> list[Spent | str]:
    """A call starts at ``at``; its answer, at ``answered``, shows ``left`` of ``limit``
    requests, the budget back in full a second later: what the answer decided."""
    started(budget, at, 1)
    mark = budget.hooked
    return budget.learn(headers(left=left, reset=1.0, limit=limit), mark=mark, now=answered,
                        left_at=budget.answered(mark))


def _answered_in_turn(budget: Budget, resets: list[float]) -> list[Spent | str]:
    """A call starts on ``budget`` each millisecond, one per reset, and is answered 5 ms
    later, the n-th showing n of 10 requests counted and the budget back in full in its
    reset: what the last answer decided."""
    decided: list[Spent | str] = []
    for mark, reset in enumerate(resets, start=1):
        now = 0.001 * (mark - 1)
        started(budget, now, 1)
        decided = budget.learn(headers(left=10 - mark, reset=reset), mark=mark,
                               now=now + 0.005, left_at=budget.answered(mark))
    return decided


def test_a_refilling_buckets_answers_tell_its_rate_and_the_pool_goes_as_it_refills() -> None:
    """OpenAI's bucket of 10 requests a second: its answers' resets grow 0.1 s with each
    request it counts (and shrink as it refills), so together they allow only rates near 10 a
    second (each answer: more than ``counted - 1``, at most ``counted`` requests over its
    reset, to the millisecond).  Spent, the pool holds until the bucket has room for two
    requests (one of margin: see Budget._bucket_ready), about 0.2 s, then lets a call go each
    refill — at the slowest rate the answers allow, from the emptying time the freshest one
    told (before: it held until the reset, a whole second, then every waiting call went at
    once: in the benchmark's 1-s windows a tenth of each lost to the burst's spread and the
    answers' latency)."""
    resets = [0.1 * n - 0.001 * (n - 1) for n in range(1, 11)]  # (the n-th leaves at n-1 ms)
    budget = Budget()
    decided = _answered_in_turn(budget, resets)
    slowest = max((n - 1) / (reset + RESET_SLACK) for n, reset in enumerate(resets, start=1))
    fastest = min(n / (reset - RESET_SLACK) for n, reset in enumerate(resets, start=1))
    assert 9 < slowest < 10 < fastest < 10.2
    assert budget.bucket_rate() == (pytest.approx(slowest), pytest.approx(fastest))
    ready = 1.0 - 8 / fastest  # the last answer: empty at 1.0, room for two 8 before
    assert decided == [FREED, Spent(pytest.approx(ready), "budget spent (RPM)",
                                    Cause.REQUESTS_SPENT)]
    assert ready == pytest.approx(0.21, abs=0.005)
    # Each call that goes fills the bucket a slowest refill more: the next waits that long.
    for _ in range(3):
        went = started(budget, ready, 1)
        ready += 1 / slowest
        assert went == Spent(pytest.approx(ready), "budget spent (RPM)", Cause.REQUESTS_SPENT)
    # The freshest answer says when the bucket has room: the pool holds until then (the two
    # calls before it, unanswered, may not be counted in it), whatever its calls pushed out.
    mark = budget.hooked
    left_at = cast(float, budget.answered(mark))
    decided = budget.learn(headers(left=0, reset=0.99), mark=mark, now=left_at + 0.005,
                           left_at=left_at)
    slowest, fastest = cast(tuple[float, float], budget.bucket_rate())  # (narrowed by it)
    assert decided == [FREED, Spent(pytest.approx(left_at + 0.99 + 2 / slowest - 8 / fastest),
                                    "budget spent (RPM)", Cause.REQUESTS_SPENT)]
    # An answer whose limit is another's (here: one that would agree on the rate) forgets it.
    budget.learn(headers(left=10, reset=1.0, limit=20), mark=budget.hooked, now=1.0)
    assert budget.bucket_rate() is None


def test_a_sliding_windows_requests_come_back_each_a_window_after_it_was_answered() -> None:
    """A sliding window of 10 a second: ten calls, 30 ms apart, each answered 20 ms later
    (the n-th showing n counted, each reset a second: the window's newest request ages out
    then).  Spent, the pool holds until the first stops counting — a second after its answer,
    1.02 — not until the last does (1.29): then one call goes, and holds it until the second
    does, and so on; a window later the calls keep the spacing of the first ones (before,
    all ten went at 1.29, and each window lost the first calls' spread).  A 429 forgets
    when they come back: the pool waits for the reset."""
    budget = Budget()
    decided: list[Spent | str] = []
    for n in range(10):
        started(budget, 0.03 * n, 1)
        decided = budget.learn(headers(left=9 - n, reset=1.0), mark=n + 1,
                               now=0.03 * n + 0.02, left_at=budget.answered(n + 1))
    assert budget.bucket_rate() is None
    assert decided == [FREED, Spent(pytest.approx(1.02), "budget spent (RPM)",
                                    Cause.REQUESTS_SPENT)]
    holds = []
    now = 1.02
    for n in range(10, 15):  # each call goes when the pool is back, and is answered
        held = started(budget, now, 1)
        holds.append(cast(Spent, held).until)
        decided = budget.learn(headers(left=0, reset=1.0), mark=n + 1, now=now + 0.02,
                               left_at=budget.answered(n + 1))
        assert decided[-1] == held, n
        now = held.until
    assert holds == pytest.approx([1.05, 1.08, 1.11, 1.14, 1.17])
    budget.limited(now, 0, told=None, cooled=0.5)
    assert started(budget, now, 1) == Spent(pytest.approx(1.17 - 0.03 + 0.02 + 1.0),
                                            "budget spent (RPM)", Cause.REQUESTS_SPENT)


@pytest.mark.parametrize("b_answered", [0.23, 0.39])
def test_an_answer_overtaken_on_the_way_shows_no_more_left_than_the_one_before(
    b_answered: float,
) -> None:
    """A sliding window of 4: two calls answered (at 0.0 and 0.1), then A leaves at 0.2 and
    B 5 ms after it; the server counts B first (1 left) and A (0 left), and A's answer comes
    first — B's 10 ms or 170 ms later (its window told by its reset stamped from when B left,
    not from when its answer came).  B's answer, the freshest by the order they left in,
    shows 1 left: taken as it is, it would let a call go into a full window (a 429).  The
    pool takes no more left than A's answer shows now — which counts B once more, as A did
    not show it: back when the second call stops counting, a call late rather than one too
    many."""
    budget = Budget()
    for n, at in enumerate((0.0, 0.1)):
        _call(budget, at, answered=at + 0.02, left=3 - n, limit=4)
    started(budget, 0.2, 1)
    started(budget, 0.205, 2)
    a_left, b_left = budget.answered(3), budget.answered(4)
    budget.learn(headers(left=0, reset=1.0, limit=4), mark=3, now=0.22, left_at=a_left)
    decided = budget.learn(headers(left=1, reset=1.0, limit=4), mark=4, now=b_answered,
                           left_at=b_left)
    assert decided == [FREED, Spent(pytest.approx(1.12), "budget spent (RPM)",
                                    Cause.REQUESTS_SPENT)]


def test_what_the_pool_did_not_see_counted_comes_back_at_the_reset() -> None:
    """A sliding window of 3: the pool's one call went at 0.0, its answer 0.2 s later (2
    left); another process's requests arrive at 0.5 and 1.005, unseen.  The pool's next call,
    at 1.1, shows 0 left: its first call stopped counting at 1.0 — before this one left
    (by more than OVERTAKE), though its answer's reset, stamped from when that answer came,
    says 1.2 — so it is not among those counted, and nothing comes back before the reset
    (taken as counted, it would have let a call go at 1.2 into the full window).  And a call
    whose request the server counted but whose answer failed (no headers) is not known
    either: the pool's other requests come back as they stop counting, that one at the
    reset."""
    budget = Budget()
    _call(budget, 0.0, answered=0.2, left=2, limit=3)
    decided = _call(budget, 1.1, answered=1.12, left=0, limit=3)
    assert decided == [Spent(pytest.approx(2.12), "budget spent (RPM)", Cause.REQUESTS_SPENT)]
    budget = Budget()
    _call(budget, 0.0, answered=0.02, left=2, limit=3)
    started(budget, 0.5, 1)
    budget.answered(2)  # a 500 after the server counted it
    _call(budget, 0.6, answered=0.62, left=1, limit=3)
    decided = _call(budget, 1.06, answered=1.08, left=0, limit=3)
    assert decided == [FREED, Spent(pytest.approx(1.62), "budget spent (RPM)",
                                    Cause.REQUESTS_SPENT)]
    assert started(budget, 1.62, 1) == Spent(pytest.approx(2.08), "budget spent (RPM)",
                                             Cause.REQUESTS_SPENT)


def test_a_sliding_window_whose_resets_vary_gives_its_requests_back_too() -> None:
    """A sliding window's resets that vary by a few milliseconds (the server's clock, its
    rounding) make its answers look like a bucket's that then disagree: still no bucket, and
    the spent pool still gets each request back as it stops counting, before the reset."""
    budget = Budget()
    decided = _answered_in_turn(budget, [1.0, 0.995] * 5)
    assert budget.bucket_rate() is None
    assert decided[-1] == Spent(pytest.approx(0.001 + 0.005 + 0.995), "budget spent (RPM)",
                                Cause.REQUESTS_SPENT)  # (the reset: 0.009 + 0.005 + 0.995)


def test_a_bucket_holds_no_longer_than_the_reset_and_no_days_reset_is_one() -> None:
    """An answer of a bucket known, shown spent while calls it does not count are in flight,
    holds the pool no longer than its reset (each counts as a whole slowest refill, but the
    bucket fills no further than its limit); a reset over a minute, of a day's limit, ends the
    bucket: no pool is paced by a day's refill."""
    resets = [0.1 * n - 0.001 * (n - 1) for n in range(1, 11)]
    budget = Budget()
    _answered_in_turn(budget, resets)
    for _ in range(9):  # in flight, not counted in the answer below
        started(budget, 0.5, 1)
    mark = budget.hooked - 8
    decided = budget.learn(headers(left=0, reset=0.99), mark=mark, now=0.52, left_at=0.5)
    assert decided == [FREED, Spent(pytest.approx(0.52 + 0.99), "budget spent (RPM)",
                                    Cause.REQUESTS_SPENT)]  # (not 0.5 + 0.99 + 8 / 9.07 - 0.79)
    budget = Budget()
    _answered_in_turn(budget, resets)
    budget.learn(headers(left=0, reset=3600.0), mark=budget.hooked, now=2.0)
    assert budget.bucket_rate() is None


def test_a_bucket_that_others_spend_unseen_is_not_paced_by_what_the_pool_sends() -> None:
    """A pool paced by its bucket (see above) sends a call when the bucket has room; it meets
    a 429: the server counted requests the pool did not send (processes with a state of
    their own, other programs).  Paced by its own calls, the pool would keep sending into
    theirs (before: two processes sharing a key at 60 a minute, 113 successes and 999 429s
    where holding to the reset gave 645 and 16): it waits for the reset again, for good —
    even when later answers agree on the bucket."""
    resets = [0.1 * n - 0.001 * (n - 1) for n in range(1, 11)]
    budget = Budget()
    ready = cast(Spent, _answered_in_turn(budget, resets)[-1]).until
    started(budget, ready, 1)
    budget.limited(ready + 0.005, 0, told=None, cooled=0.1)
    assert budget.bucket_rate() is None
    mark = budget.hooked
    budget.learn(headers(left=0, reset=0.9), mark=mark, now=ready + 0.005)
    assert started(budget, ready + 0.2, 1) == Spent(
        pytest.approx(ready + 0.905), "budget spent (RPM)", Cause.REQUESTS_SPENT)
    # Calls that start before an answer told when the bucket is empty are not paced by it:
    # they spend what the answers said is left, then wait for the reset.
    budget = Budget()
    _answered_in_turn(budget, resets[:2])
    assert budget.bucket_rate() is not None
    budget.bucket_full = 0.0  # (as when the answer that agreed came out of order)
    for _ in range(7):
        assert started(budget, 0.01, 1) is None
    assert started(budget, 0.01, 1) == Spent(pytest.approx(0.006 + resets[1]),
                                             "budget spent (RPM)", Cause.REQUESTS_SPENT)


@pytest.mark.parametrize(("limiter", "resets"), [
    # a fixed window that ends at 1.0: every answer's reset is its end
    ("fixed", [1.0 - 0.001 * (n - 1) for n in range(1, 11)]),
    # a sliding window: each admission ages out a second after it
    ("sliding", [1.0] * 10),
])
def test_answers_of_a_server_that_counts_in_windows_tell_no_bucket(
    limiter: str, resets: list[float]
) -> None:
    """A window's reset does not grow with what it counts: answers that counted different
    numbers allow no common rate.  Spent, a fixed window's pool waits for the reset, as
    before; a sliding window's, for its first request to stop counting — a second after its
    answer came, as its reset said — and the next call for the second (see
    Budget._requests_counted)."""
    budget = Budget()
    _answered_in_turn(budget, resets[:2])  # (counted 1 and 2: resets within the slack)
    assert budget.bucket_rate() is None, limiter
    budget = Budget()
    decided = _answered_in_turn(budget, resets)
    reset_at = 0.009 + 0.005 + resets[-1]  # (the last answer came at 0.014)
    assert budget.bucket_rate() is None, limiter
    first, second = (reset_at, reset_at) if limiter == "fixed" else (1.005, 1.006)
    assert decided[-1] == Spent(pytest.approx(first), "budget spent (RPM)",
                                Cause.REQUESTS_SPENT)
    assert started(budget, 0.5, 1) == Spent(pytest.approx(second), "budget spent (RPM)",
                                            Cause.REQUESTS_SPENT)


def test_a_stale_answer_is_ignored_and_a_new_window_counts() -> None:
    budget = Budget()
    started(budget, 0.0, 1)
    started(budget, 0.0, 2)
    budget.answered(2)
    budget.learn(headers(left=5, reset=10.0), mark=2, now=0.0)
    assert budget.requests_left == 5 - 1  # call 1 left before it, unanswered: maybe not counted
    budget.answered(1)
    # An older answer from the same window says less: it is not the freshest.
    assert budget.learn(headers(left=1, reset=10.0), mark=1, now=0.0) == []
    assert budget.requests_left == 5 - 1
    # An older answer that shows a later window counts.
    budget.learn(headers(left=9, reset=30.0), mark=1, now=0.0)
    assert budget.requests_left == 9 - 1  # call 2 left after it


def test_answers_count_in_the_order_the_server_counted_their_requests() -> None:
    """A refilling bucket of 10 a second, whose reset moves out 0.1 s a request admitted;
    requests 1 and 2 leave in that order, and the server counts 2 first (1 left, empty in
    0.9 s), then 1 (0 left, empty in 0.95 s)."""
    # Their answers come back in 2, 1 order: 1 is the later count (its reset is later), so
    # the pool counts from its reset, not 2's (before: an older request's answer counted only
    # if its reset was a new window's, and the pool went too soon).  The two answers also
    # tell a refilling bucket (see test_a_refilling_buckets_answers_...): the pool holds
    # until it has room for two, counted from 1's reset (0.95) and call 2, which left after
    # 1 and may not be counted in its answer; from 2's (0.9), it would go at 0.1.
    budget = Budget()
    started(budget, 0.0, 1)
    started(budget, 0.0, 2)
    budget.learn(headers(left=1, reset=0.9), mark=2, now=0.02, left_at=budget.answered(2))
    slowest, fastest = 9 / (0.95 + RESET_SLACK), 9 / (0.9 - RESET_SLACK)
    assert budget.learn(headers(left=0, reset=0.95), mark=1, now=0.02,
                        left_at=budget.answered(1)) == [FREED, Spent(
        pytest.approx(0.95 + 1 / slowest - 8 / fastest), "budget spent (RPM)",
        Cause.REQUESTS_SPENT)]
    assert budget.requests_reset_at == pytest.approx(0.97)
    # In the other order, 2's answer, which left later, comes after 1's: the server counted
    # it before 1 (its reset is earlier), and its remainder frees nothing (before: 1 left,
    # the pool freed into a 429).
    budget = Budget()
    started(budget, 0.0, 1)
    started(budget, 0.0, 2)
    assert budget.learn(headers(left=0, reset=0.95), mark=1, now=0.02,
                        left_at=budget.answered(1)) == [
        Spent(pytest.approx(0.97), "budget spent (RPM)", Cause.REQUESTS_SPENT)]
    assert budget.learn(headers(left=1, reset=0.9), mark=2, now=0.02,
                        left_at=budget.answered(2)) == []
    assert budget.requests_left is not None and budget.requests_left <= 0


def test_a_long_requests_answer_is_placed_where_the_server_counted_it() -> None:
    """Resets are compared as stamped from when each request left, not when its answer
    came: a request that generated for 3 s was counted when it arrived, before one that left
    2.9 s later, though its answer comes after that one's."""
    budget = Budget()
    started(budget, 0.0, 1)  # counted at once: 9 left, full again 0.1 s later
    started(budget, 2.9, 2)  # counted at 2.9: 9 left too
    # (8 left: 1 is unanswered yet, and may not have been counted.)
    budget.learn(headers(left=9, reset=0.1), mark=2, now=2.92, left_at=budget.answered(2))
    # 1's answer comes at 3.0: stamped on arrival its reset (3.1) would be the later one,
    # and count as the freshest (held until 3.1; before: so).
    assert budget.learn(headers(left=9, reset=0.1), mark=1, now=3.0,
                        left_at=budget.answered(1)) == []
    assert (budget.requests_left, budget.requests_reset_at) == (8, pytest.approx(3.02))
    # Without when it left (a request the hook did not see), an answer is stamped on arrival.
    started(budget, 3.0, 1)
    budget.learn(headers(left=9, reset=0.1), mark=3, now=3.05)
    assert budget.requests_order_at == pytest.approx(3.15)


def test_after_a_refill_the_window_admits_its_limit_less_the_calls_since() -> None:
    budget = Budget()
    started(budget, 0.0, 1)
    budget.answered(1)
    budget.learn(headers(left=0, reset=1.0, limit=3), mark=1, now=0.0)
    budget.drained()
    for in_flight in (1, 2):
        assert started(budget, 2.0, in_flight) is None  # refilled at 1.0: 3, then 2, 1 left
    # (The call that finds the refill is in flight, and counted once: not also as in flight.)
    assert budget.window_start == 1 and budget.requests_left == 1
    # An answer from the new window that says more cannot lift the bound.
    budget.answered(2)
    budget.learn(headers(left=3, reset=3.0, limit=3), mark=2, now=2.0)
    assert budget.requests_left == 3 - 2


def test_calls_that_never_sent_stop_counting_once_the_pool_drains() -> None:
    budget = Budget()
    budget.sent += 2  # two calls started; one fails before its request leaves
    budget.send(0.0)
    budget.answered(1)
    budget.drained()
    assert (budget.sent, budget.hooked, budget.outstanding) == (1, 1, [])


def test_tokens_count_a_call_at_the_average_until_its_end_tells_its_cost() -> None:
    budget = Budget()
    budget.cost(100.0)  # the first call's cost is the average
    budget.cost(200.0)
    assert budget.avg_tokens == 0.8 * 100 + 0.2 * 200
    budget.cost(0.0)  # a call whose requests nobody saw says nothing of the average
    assert budget.avg_tokens == 120.0


def test_a_token_budget_is_spent_a_call_at_a_time_and_refilled_less_the_calls_in_flight() -> (
    None
):
    budget = Budget()
    budget.cost(100.0)
    assert started(budget, 0.0, 1) is None  # mark 1; nothing known of the budget yet
    started(budget, 0.0, 2)  # mark 2, unanswered
    budget.answered(1)
    tokens = ServerBudget(tokens_limit=1000, tokens_left=450, tokens_reset=1.0)
    assert budget.learn(tokens, mark=1, now=0.0) == []
    assert budget.tokens_left == 450 - 100  # call 2 left after the answer: one average call
    assert started(budget, 0.0, 2) is None  # 250 left
    assert started(budget, 0.0, 3) is None  # 150 left
    assert started(budget, 0.0, 4) == Spent(1.0, "budget spent (TPM)", Cause.TOKENS_SPENT)
    # After the reset, the full budget less the calls still in flight, then this one.
    assert started(budget, 2.0, 2) is None
    assert budget.tokens_left == 1000 - 1 * 100 - 100


def test_a_request_unanswered_for_long_no_longer_counts_as_unseen() -> None:
    from stable_openai._model import UNANSWERED_FOR

    budget = Budget()
    started(budget, 0.0, 1)  # mark 1: left at 0, never answered (a timeout, a cancel)
    later = UNANSWERED_FOR + 1.0
    started(budget, later, 2)  # mark 2
    budget.answered(2)
    budget.learn(headers(left=5, reset=10.0), mark=2, now=later)
    assert budget.requests_left == 5  # request 1 is counted by now, or never will be
    assert budget.outstanding == []


# --------------------------------------------------------------------------- pace from 429s


def paced_until(budget: Budget, now: float) -> float | None:
    """A call starts at ``now``: until when the pace learned from 429s then holds the pool."""
    budget.sent += 1
    for spent in budget.spend_request(now, 1):
        if spent.cause is Cause.PACED:
            return spent.until
    return None


def test_no_pace_before_a_429_and_a_429_with_a_rate_paces_at_once_a_little_below_it() -> None:
    budget = Budget()
    assert paced_until(budget, 0.0) is None
    budget.limited(1.0, in_flight=0, told=10.0, cooled=0.5)  # OpenAI's numbers: 10/s
    assert budget.pace == PACE_BACKOFF * 10.0
    # The pace restarts empty where the 429 said the server admits again: the one call that
    # goes then runs on credit, and the next waits two slots; then one call a slot, never a
    # burst.
    gap = 1.0 / budget.pace
    assert paced_until(budget, 1.5) == 1.5 + 2 * gap
    assert paced_until(budget, 1.5 + 2 * gap) == pytest.approx(1.5 + 3 * gap)
    assert paced_until(budget, 5.0) == 5.0 + gap  # unused time is not saved up


def test_the_rate_admitted_between_two_429s_paces_the_pool_once_their_calls_ended() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=2, told=None, cooled=1.0, hinted=False)  # no numbers at all
    assert budget.pace is None and budget.stale == 2
    budget.limited(0.01, in_flight=1, told=None, cooled=1.0, hinted=False)  # the same excess
    budget.admit()  # the last call of that volley was admitted before the 429
    assert budget.stale == 0 and budget.admitted == 0  # the first span had no start: unmeasured
    for _ in range(10):  # the next second admits 10 ...
        budget.admit()
    budget.limited(1.0, in_flight=1, told=None, cooled=1.0, hinted=False)  # ... then a 429
    assert budget.pace is None  # measured once the call in flight ends ...
    budget.admit()  # ... which the server admitted before the 429
    assert budget.pace == pytest.approx(PACE_BACKOFF * 11 / 1.0)


def test_a_span_runs_from_where_each_429_says_the_server_admits_again() -> None:
    # A server that admits 10 a second and whose numbers say 20: each 429 says when it admits
    # again, and what it admits next comes after that, not after the 429.
    budget = Budget()
    budget.limited(0.6, in_flight=0, told=20.0, cooled=0.4)  # admits again at 1.0
    for _ in range(10):  # 10 admitted from 1.0 ...
        budget.admit()
    budget.limited(1.2, in_flight=0, told=20.0, cooled=0.8)  # ... by 2.0
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10 / 1.0)  # not 10 / 0.6
    # A 429 that says no delay is its own mark: the backoff is the client's, not the server's.
    blind = Budget()
    blind.limited(0.6, in_flight=0, told=None, cooled=0.4, hinted=False)
    for _ in range(10):
        blind.admit()
    blind.limited(1.6, in_flight=0, told=None, cooled=0.8, hinted=False)
    assert blind.pace == pytest.approx(PACE_BACKOFF * 10 / 1.0)


def test_a_windows_size_is_what_the_next_window_gets_until_its_period_is_measured() -> None:
    # Fixed windows of 10 a second: the first 429 (at 0.6) says the window ends at 1.0 and
    # that it admits 10.  From 1.0, 10 calls go, the 10th holding the pool PROBE_WAIT: then one
    # more goes alone.
    budget = Budget()
    budget.limited(0.6, in_flight=0, told=None, cooled=0.4, limit=10)
    for _ in range(9):
        assert started(budget, 1.0, 1) is None
    assert started(budget, 1.0, 1) == Spent(1.0 + PROBE_WAIT, "paced (429s)", Cause.PACED)
    for _ in range(10):
        budget.admit()
    # The probe: it holds the pool as long again, for its answer.
    probe = 1.0 + PROBE_WAIT
    assert started(budget, probe, 1) == Spent(probe + PROBE_WAIT, "paced (429s)", Cause.PACED)
    # Its 429 tells where window 1 ends (2.0), a window after window 0's end: the windows'
    # period is measured, and the pool is allowed per window, not paced (see below).
    budget.limited(1.07, in_flight=0, told=None, cooled=0.93, limit=10)
    assert budget.period == pytest.approx(1.0) and budget.pace is None
    # Had ALLOWANCE_PROBES probes met no 429 (the limit is not where the allowance put it),
    # nothing more holds the pool: calls go as before (not one every PROBE_WAIT for good).
    free = Budget()
    free.limited(0.6, in_flight=0, told=None, cooled=0.4, limit=2)
    assert started(free, 1.0, 1) is None
    for probe in range(1 + ALLOWANCE_PROBES):  # (the 2nd call, then the probes)
        assert started(free, 1.0 + probe * PROBE_WAIT, 1) is not None
        free.admit()
    assert [started(free, 3.0, 1) for _ in range(50)] == [None] * 50
    assert free.allowance is None
    # Without the window's size (an Azure 429), or without any number or hint (a blind one):
    # as many as the pool was admitted until then (7 here; the calls before the pool's first
    # 429 are counted too, by the ring).
    for hinted in (True, False):
        other = Budget()
        other.admitted = 7
        other.limited(0.6, in_flight=0, told=None, cooled=0.4, hinted=hinted)
        assert other.allowance == 7
    # A 429 whose numbers give a rate paces the pool at once: no allowance.
    paced = Budget()
    paced.limited(0.6, in_flight=0, told=10.0, cooled=0.1, limit=10)
    assert paced.allowance is None and paced.pace == pytest.approx(PACE_BACKOFF * 10)


def window_of(budget: Budget, now: float, calls: int, admitted: int | None = None) -> list[float]:
    """``calls`` calls start at ``now`` (``admitted`` of them succeed: all unless said):
    until when each held the pool (its allowance per window), for those that did."""
    holds = []
    for call in range(calls):
        spent = started(budget, now, 1)
        if spent is not None:
            assert spent.cause is Cause.PACED
            holds.append(spent.until)
        if admitted is None or call < admitted:
            budget.admit()
    return holds


def two_ends(calls_at: float, calls: int, at: float, cooled: float) -> Budget:
    """A pool told that a window of 10 ends at 1.0 (by a 429 at 0.75), ``calls`` calls
    admitted at ``calls_at``, then a 429 at ``at`` that says the server admits again
    ``cooled`` later."""
    budget = Budget()
    budget.limited(0.75, in_flight=0, told=None, cooled=0.25, limit=10)
    window_of(budget, calls_at, calls)
    budget.limited(at, in_flight=0, told=None, cooled=cooled, limit=10)
    return budget


def test_a_pool_that_knows_the_servers_windows_gets_their_size_each_and_holds_to_their_end(
) -> None:
    # Fixed windows of 10 a second, ending at 1.0, 2.0, ...: two 429s that tell window ends a
    # window apart, with a window's calls between them, measure the period.
    budget = Budget()
    budget.limited(0.75, in_flight=0, told=None, cooled=0.25, limit=10)
    assert budget.period is None
    window_of(budget, 1.0, 10)
    budget.limited(1.125, in_flight=0, told=None, cooled=0.875, limit=10)
    assert budget.period == 1.0 and budget.period_end == 2.0 and budget.pace is None
    # Each window gets its 10 calls at once, the 10th holding the pool until the window ends
    # — a little after, by PERIOD_SLACK of a period (the ends it knows are told late, but the
    # period may be short): a window admits its calls wherever in it they come.
    late = PERIOD_SLACK * 1.0
    assert window_of(budget, 1.5, 3) == [2.0 + late] * 3  # (window 1, spent already)
    assert window_of(budget, 2.0, 10) == [3.0 + late]
    assert window_of(budget, 3.25, 10) == [4.0 + late]
    # A window that meets a 429 before its size is spent (another process takes some of the
    # key's calls): the next window gets what that one admitted.
    assert window_of(budget, 4.125, 6) == []
    budget.limited(4.25, in_flight=0, told=None, cooled=0.75, limit=10)
    assert budget.period == 1.0 and budget.allowance == 0
    assert window_of(budget, 5.125, 6) == [6.0 + late]
    # Each window that spends all it got without a 429 raises the size by PERIOD_GAIN, up to
    # the limit the 429s named.
    windows = 0
    while budget.period_size < 10:
        windows += 1
        window_of(budget, 5.125 + windows, 10)
    assert windows == pytest.approx(4 / PERIOD_GAIN, abs=1)
    window_of(budget, 6.125 + windows, 10)
    assert budget.period_size == 10
    # Idle windows are skipped: the next call's window is the one it starts in.
    assert window_of(budget, 100.5, 10) == [101.0 + late]
    # A period within PERIOD_SLACK of a known one (1 s here) is taken as it: each end is told
    # late by as long as its 429 took to answer.
    budget.limited(100.625, in_flight=0, told=None, cooled=0.375 + 2**-7, limit=10)
    assert budget.period == 1.0
    # A window whose first call meets a 429 (another process took it) halves the size.
    assert window_of(budget, 101.0 + 2**-7, 1, admitted=0) == []
    budget.limited(101.0 + 2**-6, in_flight=0, told=None, cooled=1.0 - 2**-6, limit=10)
    assert window_of(budget, 102.0 + 2**-6, 5) == [103.0 + late]
    # A 429 whose end falls off the windows ends them, and the span spent in them measures no
    # pace (their calls went in bursts): the pool is allowed as before a period was known, and
    # the next end, once calls were admitted, measures them anew.
    budget.limited(102.25, in_flight=0, told=None, cooled=0.25, limit=10)
    assert budget.period is None and budget.pace is None and budget.allowance == 10
    window_of(budget, 102.5, 10)
    budget.limited(102.625, in_flight=0, told=None, cooled=0.875, limit=10)
    assert budget.period == 1.0 and budget.period_end == 103.5
    # A 429 that gives a rate (a refilling bucket's) paces the pool instead.
    budget.limited(103.0, in_flight=0, told=10.0, cooled=0.1)
    assert budget.period is None and budget.pace is not None
    azure = Budget()
    azure.admitted = 7  # (Azure names no size: what the pool was admitted before, as above)
    azure.limited(0.75, in_flight=0, told=None, cooled=0.25)
    window_of(azure, 1.0, 7)
    azure.limited(1.125, in_flight=2, told=None, cooled=0.875)
    assert azure.period == 1.0 and azure.period_size == 7 and azure.period_limit is None
    azure.admit()  # (one of the two in flight: the server counted it before the 429)
    azure.ended()
    assert window_of(azure, 2.0, 8) == [3.0 + late]  # the next window gets all it admitted
    # Leaving the windows (an end off them), the pool gets a window's size, not all it was
    # admitted in them.
    for second in range(3, 5):
        window_of(azure, second, 8)
    azure.limited(5.5, in_flight=0, told=None, cooled=0.25)
    assert azure.period is None and azure.allowance == 8
    azure.limited(6.0, in_flight=0, told=None, cooled=1.0, hinted=False)
    assert azure.period is None
    # Windows of half a second: the period is measured over all the ends since the first.
    half = Budget()
    half.limited(0.25, in_flight=0, told=None, cooled=0.25, limit=5)
    window_of(half, 0.5, 5)
    half.limited(0.625, in_flight=0, told=None, cooled=0.375 + 2**-8, limit=5)
    assert half.period == 0.5 + 2**-8
    for start in (1.0, 1.5, 2.0, 2.5):
        window_of(half, start + 2**-6, 5)
    half.limited(3.0, in_flight=0, told=None, cooled=2**-7, limit=5)
    assert half.period == (3.0 + 2**-7 - 0.5) / 5
    # Once an answer's headers tell the budget (a pooled client's), they pace the pool: its
    # windows and allowance from 429s are over.
    half.sent += 1
    mark = half.send(3.25)
    half.learn(ServerBudget(requests_limit=5, requests_left=3, requests_reset=0.25), mark, 3.25)
    assert half.period is None and half.allowance is None
    # Two ends are no windows' period unless a 429 of the allowance the first gave tells the
    # second, in the first half of the span, with calls admitted, within MAX_PERIOD: not two
    # 429s an hour apart ...
    assert two_ends(1.0, 5, 3600.0, 0.5).period is None
    # ... nor two with nothing admitted between, nor two a pace (a rate told) lies between ...
    assert two_ends(1.0, 0, 1.125, 0.875).period is None
    # ... nor two a window apart whose 429 came late in the span (it may be a later window's:
    # the allowance's calls went late in window 1, the probe's 429 is window 2's) ...
    assert two_ends(1.875, 10, 2.5, 0.5).period is None
    # ... nor a period far from the known ones (KNOWN_PERIODS) taken as one of them.
    assert two_ends(1.0, 10, 1.125, 1.0 - 2**-7).period == 1.125 - 2**-7  # (not 1 s)
    paced = Budget()
    paced.limited(0.0, in_flight=0, told=10.0, cooled=0.125)
    paced.limited(1.0, in_flight=1, told=None, cooled=0.5, limit=10)
    paced.limited(62.0, in_flight=0, told=None, cooled=0.5, limit=10)  # (a call never ended)
    assert paced.period is None
    assert started(paced, 62.5, 1) is not None  # (paced, as before)


def test_the_pool_is_paced_at_what_it_was_admitted_never_above_what_the_429s_say() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=10.0, cooled=0.0)
    assert budget.pace == PACE_BACKOFF * 10.0  # at once, before any span is measured
    for _ in range(5):
        budget.admit()
    # 5 a second admitted though the key refills 10: other processes use it too.
    budget.limited(1.0, in_flight=0, told=10.0, cooled=0.0)
    assert budget.pace == pytest.approx(PACE_BACKOFF * 5.0)
    for _ in range(30):
        budget.admit()
    budget.limited(2.0, in_flight=0, told=10.0, cooled=0.0)  # 30 admitted: the numbers hold
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10.0)


def test_each_success_raises_the_pace_a_little() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=10.0, cooled=0.0)
    for _ in range(100):
        budget.admit()
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10.0 * (1 + PACE_GAIN) ** 100)


def test_time_the_pool_was_not_busy_does_not_count_in_the_rate_it_admitted() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=10.0, cooled=0.0)
    gap = 1.0 / budget.pace  # type: ignore[operator]
    paced_until(budget, 0.0)
    paced_until(budget, 60.0)  # a minute without calls: all but two calls' gaps unused
    idle = budget.idle
    assert idle == pytest.approx(60.0 - 2 * gap)  # (the first went on credit: see above)
    for _ in range(15):
        budget.admit()
    budget.limited(61.0, in_flight=0, told=None, cooled=0.0)  # no numbers this time
    # 15 calls over the second (and a bit) the pool was busy, not over 61 s.
    assert budget.pace == pytest.approx(PACE_BACKOFF * 15 / (61.0 - idle))


def test_other_endings_of_the_calls_in_flight_close_the_span_too() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=None, cooled=0.0)
    for _ in range(4):
        budget.admit()
    budget.limited(2.0, in_flight=2, told=None, cooled=0.0)
    budget.ended()  # abandoned
    assert budget.pace is None
    budget.ended()  # a 500
    assert budget.pace == pytest.approx(PACE_BACKOFF * 2.0)


def test_a_429_a_minute_after_the_last_is_fresh_though_a_call_never_ended() -> None:
    budget = Budget()
    budget.limited(0.0, in_flight=1, told=10.0, cooled=0.0)  # its call in flight never ends
    budget.limited(UNANSWERED_FOR + 1.0, in_flight=1, told=5.0, cooled=0.0)
    assert budget.pace == PACE_BACKOFF * 5.0 and budget.stale == 1


def test_a_span_in_which_nothing_was_admitted_halves_the_pace() -> None:
    # Processes that share the key unseen take its limit: the pool keeps to its pace and
    # meets 429 after 429 with no success between; each such span halves the pace (before,
    # it measured nothing, and a short "try again in" kept every process retrying into a
    # server that counts rejected requests: 0.12 of the limit with 4 processes, measured).
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=10.0, cooled=0.1)
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10.0)
    budget.limited(0.3, in_flight=0, told=10.0, cooled=0.1)  # nothing admitted since
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10.0 * PACE_DROP)
    budget.limited(0.9, in_flight=0, told=10.0, cooled=0.1)
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10.0 * PACE_DROP**2)
    budget.admit()
    budget.admit()
    budget.limited(2.0, in_flight=0, told=10.0, cooled=0.1)  # 2 admitted in the 1.1 s span
    assert budget.pace == pytest.approx(PACE_BACKOFF * 2 / 1.1)


def test_a_429_that_says_no_delay_backs_off_from_the_pace_doubling_until_a_success() -> None:
    budget = Budget()
    # No pace yet: the first backoff is BLIND_FIRST, the policy's cooldown at most.
    assert budget.limited(0.0, in_flight=1, told=None, cooled=20.0, hinted=False) == BLIND_FIRST
    # A 429 of a call in flight at that one: the same backoff, not doubled.
    assert budget.limited(0.1, in_flight=0, told=None, cooled=20.0, hinted=False) == BLIND_FIRST
    assert budget.limited(1.0, in_flight=0, told=None, cooled=20.0, hinted=False) == 2.0
    assert budget.limited(3.0, in_flight=0, told=None, cooled=20.0, hinted=False) == 4.0
    assert budget.limited(7.0, in_flight=0, told=None, cooled=5.0, hinted=False) == 5.0  # cap
    budget.pace = 10.0
    budget.admit()  # a success: back to one call of the pace
    assert budget.limited(9.0, in_flight=0, told=None, cooled=20.0, hinted=False) == pytest.approx(
        1 / (10.0 * (1 + PACE_GAIN)))
    # A delay the server named is kept as it is.
    assert budget.limited(9.5, in_flight=0, told=None, cooled=20.0) == 20.0


def test_a_429_that_says_no_delay_and_measures_the_pace_backs_off_one_call_of_it() -> None:
    """The blind pool's second 429 measures its pace (10 admitted in 1.25 s): it cools for
    one call of that pace, not BLIND_FIRST (traced in api_key mode: a second of nothing
    after the pace was known, about a tenth of the run's share)."""
    budget = Budget()
    assert budget.limited(0.0, in_flight=0, told=None, cooled=20.0, hinted=False) == BLIND_FIRST
    for _ in range(10):
        budget.admit()
    cooled = budget.limited(1.25, in_flight=0, told=None, cooled=20.0, hinted=False)
    assert budget.pace == pytest.approx(PACE_BACKOFF * 10 / 1.25)
    assert cooled == pytest.approx(1 / budget.pace)
    assert budget.pace_stamp == pytest.approx(1.25 + cooled)  # its pace restarts there
    # A call still in flight: the span is measured when it ends, at no lower a pace than
    # what it admitted so far gives: the backoff is one call of that.
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=None, cooled=20.0, hinted=False)
    for _ in range(10):
        budget.admit()
    cooled = budget.limited(1.25, in_flight=1, told=None, cooled=20.0, hinted=False)
    assert budget.pace is None
    assert cooled == pytest.approx(1.25 / (PACE_BACKOFF * 10))
    budget.admit()  # (it succeeded: the span is measured)
    assert budget.pace == pytest.approx(PACE_BACKOFF * 11 / 1.25)
    assert 1 / budget.pace < cooled


def test_a_pool_whose_429s_name_two_models_is_not_paced_from_them() -> None:
    """Budgets are per pool, not yet per model: a pace learned from one model's limit would
    hold the other model's calls too."""
    budget = Budget()
    budget.limited(0.0, in_flight=0, told=2.0, cooled=0.5, model="gpt-4o")
    assert budget.pace == PACE_BACKOFF * 2.0 and budget.pace_model == "gpt-4o"
    budget.limited(1.0, in_flight=0, told=2.0, cooled=0.5, model="gpt-4o")  # the same model
    assert budget.pace is not None
    budget.limited(2.0, in_flight=0, told=10.0, cooled=0.1, model="gpt-4o-mini")
    assert budget.pace is None and budget.pace_model == MIXED
    budget.limited(3.0, in_flight=0, told=10.0, cooled=0.1, model="gpt-4o-mini")
    assert budget.pace is None
    assert paced_until(budget, 3.5) is None


def test_a_pool_serving_two_models_forgets_and_ignores_the_headers_of_one() -> None:
    """OpenAI's x-ratelimit headers are of the answered model's limit: once a pool's calls
    named two models, the budget a header told is not the pool's — forgotten, and later
    headers are not taken, nor does a new client probe the pool."""
    budget = Budget()
    assert started(budget, 0.0, in_flight=1) is None
    assert budget.learn(headers(0, 30.0), mark=1, now=0.1) == [
        Spent(30.1, "budget spent (RPM)", Cause.REQUESTS_SPENT)]
    budget.admit("gpt-4o")
    assert budget.requests_left == 0  # one model so far: its headers are the pool's
    budget.admit("gpt-4o-mini")
    assert budget.pace_model == MIXED
    assert (budget.requests_left, budget.requests_limit, budget.snapshot) == (None, None, -1)
    assert started(budget, 1.0, in_flight=1) is None  # nothing holds the pool now
    assert budget.learn(headers(0, 30.0), mark=2, now=1.1) == []
    assert started(budget, 1.2, in_flight=2) is None
    budget.probe(keys=2, in_flight=0)
    assert not budget.probing and budget.requests_left is None


@pytest.mark.parametrize("size", [3, SLIDE_MOST, SLIDE_MOST + 1])
def test_a_sliding_windows_429_keeps_the_pool_to_the_window_up_to_slide_most(size: int) -> None:
    """A sliding window's 429 (``_limits.pace_of``): a window of up to ``SLIDE_MOST`` is kept
    to, call by call — its first request ages out at the wait, the others are taken to age
    out with the last; a longer one is paced at its rate, as before (the list would be too
    long to keep, in memory and in Redis, call after call)."""
    budget = Budget()
    budget.limited(0.5, 0, told=size / 1.0, cooled=0.5, limit=size, reset=1.0, sliding=True)
    if size > SLIDE_MOST:
        assert budget.slide_period is None
        assert budget.pace == pytest.approx(PACE_BACKOFF * size)
        return
    assert budget.pace is None
    assert budget.slide_period == pytest.approx(1.0 + SLIDE_SLACK)
    assert budget.spend_request(1.0, 1) == [Spent(1.5, "paced (429s)", Cause.PACED)]
    for _ in range(size - 2):  # the first aged out at 1.0, the others at 1.5: they go ...
        assert budget.spend_request(1.5, 1) == []
    (spent,) = budget.spend_request(1.5, 1)
    assert spent.until == pytest.approx(1.0 + 1.0 + SLIDE_SLACK)  # ... until the one of 1.0


def test_a_429_in_a_sliding_window_the_pool_keeps_to_counts_the_window_as_it_says() -> None:
    """A window of 3, all aging out at 1.0: three calls go then, and two at 2.05, the second
    of which meets a 429 (whatever its numbers read as, once the pool keeps to a window):
    the oldest of the window's 3 ages out at 2.1, the last at 3.06.  The call that met it is
    not counted; the two requests the pool does not know of are (one at 2.1, one with the
    last), and the call of 2.05 that it counts ages out 0.04 s later, the window longer by
    as much."""
    budget = Budget()
    budget.limited(0.0, 0, told=3.0, cooled=1.0, limit=3, reset=1.0, sliding=True)
    period = 1.0 + SLIDE_SLACK
    for _ in range(3):
        budget.spend_request(1.0, 1)
        budget.admit()
    budget.spend_request(1.0 + period, 1)
    budget.admit()
    budget.spend_request(1.0 + period, 1)
    budget.limited(2.06, 0, told=3.0, cooled=0.04, limit=3, reset=1.0)
    assert budget.slide_period == pytest.approx(period + 0.04)
    assert budget.spend_request(2.1, 1) == [Spent(3.06, "paced (429s)", Cause.PACED)]
    (spent,) = budget.spend_request(3.06, 1)
    assert spent.until == pytest.approx(1.0 + 2 * period + 0.04)


def test_a_sliding_window_that_counts_others_calls_unseen_paces_the_pool_instead() -> None:
    """The window's 3 are the pool's one call and two it did not send, and the pool met a 429
    before a window's worth of its calls succeeded: others share the window unseen (other
    processes, other programs).  The pool is paced by the 429s' numbers and what it is
    admitted (``Budget._close``), which takes its share, and keeps to no window again."""
    budget = Budget()
    budget.limited(0.0, 0, told=3.0, cooled=1.0, limit=3, reset=1.0, sliding=True)
    assert budget.spend_request(1.0, 1) == []
    budget.limited(1.01, 0, told=3.0, cooled=0.09, limit=3, reset=0.99, sliding=True)
    assert budget.slide_period is None
    assert budget.pace == pytest.approx(PACE_BACKOFF * 3.0)
    budget.limited(3.0, 0, told=3.0, cooled=0.5, limit=3, reset=1.0, sliding=True)
    assert budget.slide_period is None and budget.pace is not None


def test_429s_that_meet_a_pool_keeping_to_a_sliding_window_lengthen_it_a_little_at_most() -> None:
    """Each 429 that meets the pool in its window says its calls came that much early, and
    lengthens the window by as much — to ``SLIDE_STRETCH`` over the longest a 429's reset
    showed it (and ``SLIDE_SLACK``), and no further: 429s caused by others (unseen, between
    its calls) would otherwise lengthen it for good, a little less of the window used each
    time."""
    budget = Budget()
    budget.limited(0.0, 0, told=3.0, cooled=1.0, limit=3, reset=1.0, sliding=True)
    least = 1.0 + SLIDE_SLACK
    for n in range(1, 6):
        for _ in range(3):
            budget.spend_request(float(n), 1)
            budget.admit()
        budget.limited(n + 0.01, 0, told=3.0, cooled=0.5, limit=3, reset=1.0)
        longest = least * (1 + SLIDE_STRETCH)
        assert budget.slide_period == pytest.approx(min(least + 0.5 * n, longest))
