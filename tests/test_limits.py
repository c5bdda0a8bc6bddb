"""Reading a 429's message: which limit broke, its numbers, and the server's own rate.

The messages are OpenAI's (and Groq's) as published (../shared/RATE_LIMITS.md §2); the rates
are checked against the limits they come from."""

from __future__ import annotations

import math

import pytest

from stable_openai._budget import ServerBudget
from stable_openai._limits import Lesson, RateLimit, pace_of, read_rate_limit

TPM = ("Rate limit reached for gpt-4o in organization org-XXX on tokens per min (TPM): Limit "
       "30000, Used 29937, Requested 385. Please try again in 644ms. Visit "
       "https://platform.openai.com/account/rate-limits to learn more.")
RPM = ("Rate limit reached for gpt-4o-mini in organization org-abc on requests per min (RPM): "
       "Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
       "https://platform.openai.com/account/rate-limits to learn more.")
RPD = ("Rate limit reached for gpt-4o in organization org-abc on requests per day (RPD): Limit "
       "50, Used 50, Requested 1. Please try again in 28m48s. Visit "
       "https://platform.openai.com/account/rate-limits to learn more. You can increase your "
       "rate limit by adding a payment method to your account at "
       "https://platform.openai.com/account/billing.")
GROQ = ("Rate limit reached for model `llama-3.3-70b-versatile` in organization `org_01abc` "
        "service tier `on_demand` on tokens per day (TPD): Limit 100000, Used 98485, Requested "
        "1940. Please try again in 6m7.2s. Need more tokens?")


def test_a_tokens_per_minute_429_gives_the_servers_token_rate() -> None:
    limit = read_rate_limit(TPM)
    assert limit == RateLimit(kind="tokens", daily=False, model="gpt-4o", limit=30000,
                              used=29937, requested=385, try_again=0.644)
    assert limit.refill == pytest.approx(0.644 / 322)  # 2 ms a token: 30000 a minute
    assert limit.window == pytest.approx(60.0, rel=0.01)


def test_a_requests_per_minute_429_gives_the_time_one_request_refills() -> None:
    limit = read_rate_limit(RPM)
    assert limit is not None and (limit.kind, limit.daily, limit.model) == (
        "requests", False, "gpt-4o-mini")
    assert limit.refill == pytest.approx(20.0)  # 3 a minute
    assert limit.window == pytest.approx(60.0)


def test_a_daily_429_says_so_and_its_rate_is_the_days() -> None:
    limit = read_rate_limit(RPD)
    assert limit is not None and limit.daily and limit.kind == "requests"
    assert limit.try_again == 28 * 60 + 48
    assert limit.window == pytest.approx(86400.0)  # 50 a day


def test_groqs_429_names_its_model_in_backquotes() -> None:
    limit = read_rate_limit(GROQ)
    assert limit is not None
    assert (limit.model, limit.kind, limit.daily) == ("llama-3.3-70b-versatile", "tokens", True)
    assert limit.refill == pytest.approx(367.2 / 425)
    assert limit.window == pytest.approx(86400.0, rel=0.001)


def test_a_message_without_numbers_names_the_limit_but_no_rate() -> None:
    old = ("Rate limit reached for 10KTPM-200RPM in organization org-a on tokens per min. "
           "Limit: 10000 / min. Please try again in 6ms. Contact us ...")
    limit = read_rate_limit(old)
    assert limit is not None and limit.kind == "tokens" and limit.limit == 10000
    assert limit.refill is None and limit.try_again == pytest.approx(0.006)


def test_a_project_and_a_request_too_large_are_read() -> None:
    limit = read_rate_limit(
        "Request too large for gpt-4o in organization org-a in project proj_b on tokens per "
        "min (TPM): Limit 30000, Requested 31538. The input or output tokens must be reduced.")
    assert limit is not None and limit.model == "gpt-4o"
    assert (limit.limit, limit.used, limit.requested, limit.refill) == (30000, None, 31538, None)


@pytest.mark.parametrize("message", [
    "You exceeded your current quota, please check your plan and billing details.",
    "Rate limit exceeded: free-models-per-min. ",  # OpenRouter: no numbers
    "Resource has been exhausted (e.g. check quota).",  # Gemini
    "",
])
def test_messages_that_name_no_limit_give_none(message: str) -> None:
    assert read_rate_limit(message) is None


def test_the_simulators_429s_give_its_rate() -> None:
    """The strict simulator's 429s (4 keys of 10 requests a 1-s window) carry OpenAI's words
    with its compressed clock: the rate read is the simulator's, not 'per min'."""
    import openai

    from stable_openai.simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig

    sim = Simulator(SimulatorConfig(keys=(SimKey("sk-limits-test-key-000000000001", project="p"),),
                                    projects={"p": ProjectLimits(rpm=10)}, window=1.0))
    sim.start()
    try:
        client = openai.OpenAI(api_key="sk-limits-test-key-000000000001", base_url=sim.base_url,
                               max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            for _ in range(20):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        client.close()
    finally:
        sim.stop()
    limit = read_rate_limit(caught.value.message)
    assert limit is not None and limit.kind == "requests" and limit.limit == 10
    assert limit.refill == pytest.approx(0.1, rel=0.05)  # 10 a second


# --------------------------------------------------------------------------- what paces a pool


def test_a_429s_numbers_pace_its_pool_at_the_rate_they_give() -> None:
    assert pace_of(RPM) == Lesson(True, pytest.approx(1 / 20.0), "gpt-4o-mini")  # 3 a minute
    # The 429's own headers agree: the bucket that refused it is full, empty in a minute.
    full = ServerBudget(requests_limit=3, requests_left=0, requests_reset=60.0)
    assert pace_of(RPM, full) == Lesson(True, pytest.approx(1 / 20.0), "gpt-4o-mini", limit=3,
                                        reset=60.0)  # (its size and reset: see _model._slid)


def test_numbers_that_say_when_a_window_ends_are_no_rate_and_a_sliding_windows_reset_is() -> None:
    # Fixed windows of 10: the 11th request 0.3 s before the window ends is told to try again
    # in 0.3 s, which reads as a request every 0.3 s; the headers say the whole limit is back
    # in those same 0.3 s, where a bucket would take 10 refills.
    message = RPM.replace("Limit 3, Used 3", "Limit 10, Used 10").replace("20s", "300ms")
    window = ServerBudget(requests_limit=10, requests_left=0, requests_reset=0.3)
    # (Its size is the window's: what the next one admits, until a rate is measured.)
    assert pace_of(message, window) == Lesson(True, None, "gpt-4o-mini", limit=10)
    # A sliding window of 10 a second: its oldest admission ages out in 22 ms, which reads as
    # 45 a second; the headers say the whole limit is back only in 936 ms, when the last does
    # (just before this 429), where a bucket would take 10 refills (220 ms): 10 in 936 ms.
    message = message.replace("300ms", "22ms")
    sliding = ServerBudget(requests_limit=10, requests_left=0, requests_reset=0.936)
    assert pace_of(message, sliding) == Lesson(True, pytest.approx(10 / 0.936), "gpt-4o-mini",
                                               limit=10, reset=0.936, sliding=True)
    bucket = ServerBudget(requests_limit=10, requests_left=0, requests_reset=0.22)
    assert pace_of(message, bucket) == Lesson(True, pytest.approx(1 / 0.022), "gpt-4o-mini",
                                              limit=10, reset=0.22)
    # A sliding window after a burst: its oldest admission ages out in 517 ms, which reads
    # as a window's end (a bucket would take 5.17 s to empty); but the last ages out only in
    # 900 ms, where a fixed window's whole limit is back when the request is admitted.
    message = message.replace("22ms", "517ms")
    after_burst = ServerBudget(requests_limit=10, requests_left=0, requests_reset=0.9)
    assert pace_of(message, after_burst) == Lesson(
        True, pytest.approx(10 / 0.9), "gpt-4o-mini", limit=10, reset=0.9, sliding=True)
    # (A burst admitted within a tenth of a second of itself is one window's end.)
    burst = ServerBudget(requests_limit=10, requests_left=0, requests_reset=0.6)
    assert pace_of(message, burst) == Lesson(True, None, "gpt-4o-mini", limit=10)
    # A reset over MAX_PERIOD is a longer limit's (a day's, of the same size): the headers
    # say nothing of this one — nor a reset that reads as infinite.
    for reset in (86_400.0, math.inf):
        day = ServerBudget(requests_limit=10, requests_left=0, requests_reset=reset)
        assert pace_of(message, day) == Lesson(True, pytest.approx(1 / 0.517), "gpt-4o-mini")


def test_a_daily_429_and_a_429_whose_headers_show_budget_left_teach_no_pace() -> None:
    assert pace_of(RPD) == Lesson(False, None, "gpt-4o", daily=True)
    left = ServerBudget(requests_limit=3, requests_left=2, requests_reset=20.0)
    assert pace_of(RPM, left) == Lesson(False, None, None)  # a 429 though the budget is not spent
    tokens_spent = ServerBudget(requests_limit=3, requests_left=2, requests_reset=20.0,
                                tokens_limit=30000, tokens_left=0, tokens_reset=1.0)
    # A token limit: paced by what it admits.
    assert pace_of(TPM, tokens_spent) == Lesson(True, None, "gpt-4o")


def test_headers_of_another_limit_say_nothing_of_the_one_a_429_names() -> None:
    # A minute's 429 (Limit 3) whose headers show the day's budget (40, 30 left, resets in
    # 6 minutes): the minute's limit was reached, and its rate is the message's.
    day = ServerBudget(requests_limit=40, requests_left=30, requests_reset=360.0)
    assert pace_of(RPM, day) == Lesson(True, pytest.approx(1 / 20.0), "gpt-4o-mini")


def test_a_429_without_numbers_paces_by_what_the_pool_admits() -> None:
    assert pace_of("Rate limit exceeded: free-models-per-min.") == Lesson(True, None, None)
