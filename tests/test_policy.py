"""Unit tests of the failure policy: ``classify()``, ``retry_delay()``, ``parse_duration()``.

Every failure is a real ``openai`` exception, built by a real ``openai.OpenAI`` client from a
real HTTP response object with real headers and a real body — exactly as the client builds it
when a request fails.  No network: the response objects are constructed in memory.
"""

from __future__ import annotations

import email.utils
import importlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

import openai
import pytest

from stable_openai._cause import Cause
from stable_openai._policy import (
    MAX_HINT_SECONDS,
    Action,
    Fate,
    Policy,
    Verdict,
    classify,
    parse_duration,
    retry_delay,
)


def _http_module() -> ModuleType:
    """The HTTP package the installed ``openai`` builds on: ``httpx2`` (openai 3) or ``httpx``."""
    try:
        return importlib.import_module("httpx2")
    except ImportError:  # pragma: no cover - depends on the installed openai
        return importlib.import_module("httpx")


httpx = _http_module()

URL = "https://api.openai.com/v1/chat/completions"
#: A fixed wall clock for HTTP-date ``Retry-After`` headers: 2015-10-21 07:28:00 UTC.
NOW_WALL = 1445412480.0


def fixed_now() -> float:
    return NOW_WALL


def http_date(seconds_from_now: float) -> str:
    return email.utils.formatdate(NOW_WALL + seconds_from_now, usegmt=True)


# -- building real openai exceptions ----------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    api = openai.OpenAI(
        api_key="sk-test-made-up", base_url="http://127.0.0.1:9/v1", max_retries=0
    )
    yield api
    api.close()


def make_request() -> Any:
    return httpx.Request("POST", URL)


def make_error(
    client: openai.OpenAI,
    status: int,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    *,
    text: str | None = None,
) -> openai.APIStatusError:
    """The exception the client itself makes of this response (its own status → class map)."""
    all_headers = dict(headers or {})
    if text is not None:
        content = text.encode()
        all_headers.setdefault("content-type", "text/html")
    else:
        content = json.dumps(body).encode()
        all_headers.setdefault("content-type", "application/json")
    response = httpx.Response(
        status, headers=all_headers, content=content, request=make_request()
    )
    return client._make_status_error_from_response(response)


RPM_MESSAGE = (
    "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
    "Limit 3, Used 3, Requested 1. Please try again in {delay}. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
TPM_MESSAGE = (
    "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
    "Limit 30000, Used 29800, Requested 900. Please try again in {delay}. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
NO_DELAY_MESSAGE = (
    "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
    "Limit 3, Used 3, Requested 1. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
TOO_LARGE_MESSAGE = (
    "Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
    "Limit 30000, Requested 50000. The input or output tokens must be reduced in order to "
    "run successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
)
QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)


def rate_limit_body(kind: str, delay: str | None = "20s") -> dict[str, Any]:
    if delay is None:
        message = NO_DELAY_MESSAGE
    else:
        message = (RPM_MESSAGE if kind == "requests" else TPM_MESSAGE).format(delay=delay)
    return {
        "error": {
            "message": message, "type": kind, "param": None, "code": "rate_limit_exceeded",
        }
    }


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


BODIES: dict[str, Any] = {
    "too_large": error_body(TOO_LARGE_MESSAGE, "tokens", "rate_limit_exceeded"),
    "insufficient_quota": error_body(QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"),
    "invalid_api_key": error_body(
        "Incorrect API key provided: sk-abc**********wxyz. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_request_error", "invalid_api_key",
    ),
    "unsupported_country": {
        "error": {
            "code": "unsupported_country_region_territory",
            "message": "Country, region, or territory not supported",
            "param": None, "type": "request_forbidden",
        }
    },
    "timeout_408": error_body("Request timed out.", "timeout", None),
    "conflict_409": error_body("Another request is in progress.", "conflict", None),
    "server_error_500": error_body(
        "The server had an error processing your request. Sorry about that! You can retry "
        "your request, or contact us through our help center at help.openai.com.",
        "server_error", None,
    ),
    "bad_gateway_502": error_body("Bad gateway.", "server_error", None),
    "overloaded_503": error_body(
        "That model is currently overloaded with other requests. You can retry your request.",
        "server_error", None,
    ),
    "bad_request_400": error_body(
        "Invalid value for 'messages'.", "invalid_request_error", None, "messages"
    ),
    "model_not_found_404": error_body(
        "The model `gpt-9` does not exist or you do not have access to it.",
        "invalid_request_error", "model_not_found",
    ),
    "unprocessable_422": error_body("Unprocessable entity.", "invalid_request_error", None),
}


# -- the classification table -----------------------------------------------------------------

POLICY = Policy(cooldown=17.0, quota_cooldown=4321.0, forbidden_cooldown=654.0)


@pytest.mark.parametrize("kind", ["requests", "tokens"], ids=["RPM", "TPM"])
def test_429_rate_limit_cools_and_retries_elsewhere(client: openai.OpenAI, kind: str) -> None:
    exc = make_error(client, 429, rate_limit_body(kind, "20s"))
    assert isinstance(exc, openai.RateLimitError)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.fate is Fate.COOL
    assert verdict.action is Action.RETRY_ELSEWHERE
    assert verdict.rate_limited is True
    assert verdict.forbidden is False
    assert verdict.seconds == pytest.approx(20.0)
    assert verdict.cause is Cause.RATE_LIMITED


# (headers, delay in message or None, expected seconds) — each row's winner beats every source
# listed after it in the row's headers/message.
SOURCE_PRIORITY = [
    pytest.param(
        {
            "retry-after-ms": "1500", "retry-after": "7",
            "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s",
        },
        "20s", 1.5, id="retry-after-ms beats everything",
    ),
    pytest.param(
        {
            "retry-after": "7",
            "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s",
            "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s",
        },
        "20s", 7.0, id="retry-after seconds beats reset headers and message",
    ),
    pytest.param(
        {
            "retry-after": http_date(42),
            "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s",
        },
        "20s", 42.0, id="retry-after HTTP-date beats reset headers and message",
    ),
    pytest.param(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3s"},
        None, 3.0, id="reset-requests when remaining-requests is 0, without a message's wait",
    ),
    pytest.param(
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
        None, 360.0, id="reset-tokens when remaining-tokens is 0, without a message's wait",
    ),
    pytest.param(
        {
            "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30.5s",
        },
        None, 90.5, id="both budgets empty: the later reset",
    ),
    pytest.param(
        {
            "x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "3s",
            "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "9.816s",
        },
        None, 9.816, id="only the empty budget's reset counts",
    ),
    pytest.param(
        {
            "x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "3s",
            "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "12ms",
        },
        "20s", 20.0, id="reset ignored when remaining > 0: message wins",
    ),
    pytest.param(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
        "100ms", 0.1,
        id="message beats the reset (a bucket is whole again later than it admits one)",
    ),
    pytest.param(
        {"retry-after": "1", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "530ms"},
        "530ms", 0.53, id="whole-second retry-after is the message's wait rounded up",
    ),
    pytest.param(
        {"retry-after": "1", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "936ms"},
        None, 0.936, id="whole-second retry-after is the reset rounded up",
    ),
    pytest.param(
        {"retry-after": "2"}, "644ms", 2.0, id="retry-after a second or more above: it",
    ),
    pytest.param(
        {"retry-after": "1"}, "1.5s", 1.0, id="retry-after below the message's wait: it",
    ),
    pytest.param(
        {"retry-after": "1.5"}, "644ms", 1.5, id="retry-after not whole seconds: it",
    ),
    pytest.param(
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "99999999h"},
        None, MAX_HINT_SECONDS, id="reset huge capped",
    ),
    pytest.param({}, "20s", 20.0, id="message 20s"),
    pytest.param({}, "644ms", 0.644, id="message 644ms"),
    pytest.param({}, "1m2.5s", 62.5, id="message 1m2.5s"),
    pytest.param({}, "18.642s", 18.642, id="message 18.642s"),
    pytest.param({}, None, POLICY.cooldown, id="nothing from the server: Policy.cooldown"),
]


@pytest.mark.parametrize("kind", ["requests", "tokens"], ids=["RPM", "TPM"])
@pytest.mark.parametrize(("headers", "delay", "expected"), SOURCE_PRIORITY)
def test_429_delay_source_priority(
    client: openai.OpenAI,
    kind: str,
    headers: dict[str, str],
    delay: str | None,
    expected: float,
) -> None:
    exc = make_error(client, 429, rate_limit_body(kind, delay), headers)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.COOL, Action.RETRY_ELSEWHERE)
    assert verdict.rate_limited is True
    assert verdict.seconds == pytest.approx(expected)
    assert verdict.hinted is (expected != POLICY.cooldown)  # else a backoff, at most that


def test_429_without_any_hint_backs_off_at_most_the_policy_cooldown(
    client: openai.OpenAI,
) -> None:
    exc = make_error(client, 429, rate_limit_body("requests", None))
    verdict = classify(exc, now_wall=fixed_now)
    assert verdict.seconds == Policy().cooldown and not verdict.hinted
    assert verdict.fate is Fate.COOL


def test_429_request_too_large_goes_to_another_project_and_cools_nothing(
    client: openai.OpenAI,
) -> None:
    exc = make_error(client, 429, BODIES["too_large"], {"retry-after": "1"})
    assert isinstance(exc, openai.RateLimitError)
    assert exc.code == "rate_limit_exceeded"
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.fate is Fate.KEEP
    assert verdict.action is Action.OTHER_POOL  # its limit is this project's
    assert verdict.rate_limited is False
    assert verdict.cause is Cause.TOO_LARGE


def test_404_model_not_found_goes_to_another_project(client: openai.OpenAI) -> None:
    exc = make_error(client, 404, BODIES["model_not_found_404"])
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.KEEP, Action.OTHER_POOL)
    assert verdict.cause is Cause.MODEL_NOT_FOUND


@pytest.mark.parametrize(
    "headers",
    [{}, {"retry-after": "3", "x-ratelimit-remaining-requests": "0",
          "x-ratelimit-reset-requests": "1s"}],
    ids=["no headers", "with retry hints"],
)
def test_429_insufficient_quota_cools_for_quota_cooldown(
    client: openai.OpenAI, headers: dict[str, str]
) -> None:
    exc = make_error(client, 429, BODIES["insufficient_quota"], headers)
    assert isinstance(exc, openai.RateLimitError)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.fate is Fate.COOL
    assert verdict.action is Action.RETRY_ELSEWHERE
    assert verdict.seconds == POLICY.quota_cooldown
    assert verdict.rate_limited is False
    assert verdict.forbidden is False
    assert verdict.cause is Cause.NO_QUOTA


def test_401_invalid_api_key_disables(client: openai.OpenAI) -> None:
    exc = make_error(client, 401, BODIES["invalid_api_key"])
    assert isinstance(exc, openai.AuthenticationError)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.fate is Fate.DISABLE
    assert verdict.action is Action.RETRY_ELSEWHERE
    assert verdict.rate_limited is False
    assert "invalid_api_key" in verdict.reason
    assert verdict.cause is Cause.REVOKED


def test_403_unsupported_region_cools_for_forbidden_cooldown(client: openai.OpenAI) -> None:
    exc = make_error(client, 403, BODIES["unsupported_country"])
    assert isinstance(exc, openai.PermissionDeniedError)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.fate is Fate.COOL
    assert verdict.action is Action.RETRY_ELSEWHERE
    assert verdict.seconds == POLICY.forbidden_cooldown
    assert verdict.forbidden is True
    assert verdict.rate_limited is False
    assert verdict.cause is Cause.FORBIDDEN


@pytest.mark.parametrize(
    ("status", "body_name", "exc_class"),
    [
        (408, "timeout_408", openai.APIStatusError),
        (409, "conflict_409", openai.ConflictError),
        (500, "server_error_500", openai.InternalServerError),
        (502, "bad_gateway_502", openai.InternalServerError),
        (503, "overloaded_503", openai.InternalServerError),
    ],
)
def test_transient_statuses_back_off_on_the_same_key(
    client: openai.OpenAI, status: int, body_name: str, exc_class: type[Exception]
) -> None:
    exc = make_error(client, status, BODIES[body_name])
    assert isinstance(exc, exc_class)
    assert exc.status_code == status
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.KEEP, Action.BACKOFF)
    assert verdict.cause is Cause.SERVER_ERROR


@pytest.mark.parametrize(
    "make",
    [
        lambda: openai.APIConnectionError(request=make_request()),
        lambda: openai.APITimeoutError(request=make_request()),
    ],
    ids=["APIConnectionError", "APITimeoutError"],
)
def test_connection_errors_back_off(make: Any) -> None:
    verdict = classify(make(), POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.KEEP, Action.BACKOFF)
    assert verdict.cause is Cause.CONNECTION_ERROR


@pytest.mark.parametrize(
    ("status", "body_name", "exc_class"),
    [
        (400, "bad_request_400", openai.BadRequestError),
        (422, "unprocessable_422", openai.UnprocessableEntityError),
    ],
)
def test_caller_errors_are_raised(
    client: openai.OpenAI, status: int, body_name: str, exc_class: type[Exception]
) -> None:
    exc = make_error(client, status, BODIES[body_name])
    assert isinstance(exc, exc_class)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.KEEP, Action.RAISE)
    assert verdict.cause is Cause.NOT_A_KEY_PROBLEM


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyError("choices")], ids=repr)
def test_non_openai_exceptions_are_raised(exc: BaseException) -> None:
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.KEEP, Action.RAISE)
    assert verdict.cause is Cause.NOT_A_KEY_PROBLEM


def test_verdict_is_immutable() -> None:
    verdict = Verdict(Fate.KEEP, Action.RAISE)
    with pytest.raises(AttributeError):
        verdict.seconds = 3.0  # type: ignore[misc]


# -- malformed input never raises and falls through ----------------------------------------


MALFORMED_HEADERS = [
    pytest.param({"retry-after-ms": "soon", "retry-after": "4"}, 4.0, id="ms soon"),
    pytest.param({"retry-after-ms": "-300", "retry-after": "4"}, 4.0, id="ms negative"),
    pytest.param({"retry-after-ms": "inf", "retry-after": "4"}, 4.0, id="ms inf"),
    pytest.param({"retry-after-ms": "nan", "retry-after": "4"}, 4.0, id="ms nan"),
    pytest.param({"retry-after-ms": "", "retry-after": "4"}, 4.0, id="ms empty"),
    pytest.param(
        {"retry-after": "soon", "x-ratelimit-remaining-requests": "0",
         "x-ratelimit-reset-requests": "2s"},
        20.0, id="retry-after soon: the message's wait",
    ),
    pytest.param({"retry-after": "-5"}, 20.0, id="retry-after negative"),
    pytest.param({"retry-after": "inf"}, 20.0, id="retry-after inf"),
    pytest.param({"retry-after": "nan"}, 20.0, id="retry-after nan"),
    pytest.param({"retry-after": "1e400"}, 20.0, id="retry-after overflows float"),
    pytest.param({"retry-after": "Thu, 99 Foo 2015 99:99:99 GMT"}, 20.0, id="bad HTTP-date"),
    pytest.param({"retry-after": ""}, 20.0, id="retry-after empty"),
    pytest.param(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "soon"},
        20.0, id="reset unparsable",
    ),
    pytest.param(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "-1s"},
        20.0, id="reset negative",
    ),
    pytest.param({"x-ratelimit-remaining-requests": "0"}, 20.0, id="reset missing"),
    pytest.param(
        {"x-ratelimit-remaining-requests": "none", "x-ratelimit-reset-requests": "2s"},
        20.0, id="remaining not a number",
    ),
    pytest.param({"retry-after-ms": "1e15"}, MAX_HINT_SECONDS, id="ms huge capped"),
    pytest.param({"retry-after": "99999999999999999999"}, MAX_HINT_SECONDS, id="huge capped"),
    pytest.param(
        {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_HINT_SECONDS,
        id="far HTTP-date capped",
    ),
]


@pytest.mark.parametrize(("headers", "expected"), MALFORMED_HEADERS)
def test_malformed_headers_fall_through(
    client: openai.OpenAI, headers: dict[str, str], expected: float
) -> None:
    exc = make_error(client, 429, rate_limit_body("requests", "20s"), headers)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == (Fate.COOL, Action.RETRY_ELSEWHERE)
    assert verdict.seconds == pytest.approx(expected)
    assert math.isfinite(verdict.seconds)


def test_huge_delay_in_message_is_capped(client: openai.OpenAI) -> None:
    exc = make_error(client, 429, rate_limit_body("tokens", "99999999h"))
    assert classify(exc, POLICY, now_wall=fixed_now).seconds == MAX_HINT_SECONDS


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (429, (Fate.COOL, Action.RETRY_ELSEWHERE)),
        (401, (Fate.DISABLE, Action.RETRY_ELSEWHERE)),
        (403, (Fate.COOL, Action.RETRY_ELSEWHERE)),
        (500, (Fate.KEEP, Action.BACKOFF)),
        (400, (Fate.KEEP, Action.RAISE)),
    ],
)
@pytest.mark.parametrize(
    "shape",
    [
        "html text", "json list", "json string", "json number", "json null",
        "error is a string", "error is null", "error fields of wrong types", "empty body",
    ],
)
def test_odd_bodies_never_raise(
    client: openai.OpenAI, status: int, expected: tuple[Fate, Action], shape: str
) -> None:
    text: str | None = None
    body: Any = None
    if shape == "html text":
        text = "<html><body><h1>Too Many Requests</h1></body></html>"
    elif shape == "empty body":
        text = ""
    else:
        body = {
            "json list": [1, {"error": "x"}],
            "json string": "rate limited",
            "json number": 429,
            "json null": None,
            "error is a string": {"error": "Too many requests"},
            "error is null": {"error": None},
            "error fields of wrong types": {
                "error": {"message": ["slow down"], "type": 3, "code": {"x": 1}}
            },
        }[shape]
    exc = make_error(client, status, body, text=text)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert (verdict.fate, verdict.action) == expected
    if status == 429:
        assert verdict.seconds == POLICY.cooldown


def test_non_json_429_still_honours_retry_after(client: openai.OpenAI) -> None:
    exc = make_error(client, 429, text="Too Many Requests", headers={"retry-after": "3"})
    assert isinstance(exc, openai.RateLimitError)
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.seconds == 3.0
    assert verdict.rate_limited is True


def test_body_without_error_wrapper(client: openai.OpenAI) -> None:
    """Some compatible servers send the error object bare, without ``{"error": ...}``."""
    exc = make_error(client, 429, BODIES["insufficient_quota"]["error"])
    verdict = classify(exc, POLICY, now_wall=fixed_now)
    assert verdict.seconds == POLICY.quota_cooldown
    assert verdict.rate_limited is False


# -- retry_delay on its own ------------------------------------------------------------------


class ExplodingHeaders(Mapping[str, str]):
    """A header container whose every lookup fails."""

    def __getitem__(self, key: str) -> str:
        raise RuntimeError("boom")

    def get(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        (None, "", None),
        ({}, "no hint here", None),
        (None, "Please try again in 644ms.", 0.644),
        ({"retry-after": "12"}, "", 12.0),  # a plain dict
        (httpx.Headers({"Retry-After": "12"}), "", 12.0),  # real headers: case-insensitive
        (httpx.Headers({"RETRY-AFTER-MS": "250"}), "", 0.25),
        ({"retry-after": 12}, "try again in 2s", 2.0),  # not a string: ignored
        (ExplodingHeaders(), "try again in 2s", 2.0),
        ({"retry-after": http_date(-60)}, "try again in 2s", 0.0),  # a past date: ready now
    ],
)
def test_retry_delay_direct(headers: Any, message: str, expected: float | None) -> None:
    assert retry_delay(headers, message, now_wall=fixed_now) == (
        None if expected is None else pytest.approx(expected)
    )


@pytest.fixture
def local_time_zone_5h_west() -> Iterator[None]:
    """Run with the process's local time zone 5 h west of UTC (POSIX TZ, no tzdata needed)."""
    if not hasattr(time, "tzset"):  # pragma: no cover - Windows
        pytest.skip("time.tzset() is not available")
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST5"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:30 GMT",  # IMF-fixdate (RFC 9110 preferred form)
        "Wednesday, 21-Oct-15 07:28:30 GMT",  # obsolete RFC 850 form
        "Wed Oct 21 07:28:30 2015",  # obsolete asctime form: no zone, but it is UTC
        "Wed, 21 Oct 2015 07:28:30 -0000",  # RFC 5322 "UTC, local zone unknown"
    ],
    ids=["IMF-fixdate", "RFC850", "asctime", "minus-0000"],
)
def test_retry_after_http_date_is_utc_whatever_the_local_time_zone(
    local_time_zone_5h_west: None, value: str
) -> None:
    """RFC 9110 §5.6.7: every HTTP-date is UTC and recipients must accept all three forms.

    The asctime and ``-0000`` forms carry no usable zone; they must not be read as local time.
    """
    assert retry_delay({"retry-after": value}, "", now_wall=fixed_now) == pytest.approx(30.0)


# -- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("9.816s", 9.816),
        ("1m30.5s", 90.5),
        ("2h", 7200.0),
        ("500us", 0.0005),
        ("500µs", 0.0005),
        ("250ns", 2.5e-7),
        ("1h2m3s", 3723.0),
        (".5s", 0.5),
        ("1.5", 1.5),
        ("20", 20.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("  3s  ", 3.0),
        ("", None),
        ("   ", None),
        ("abc", None),
        ("1x", None),
        ("s", None),
        ("-1s", None),
        ("-1", None),
        ("1s ", 1.0),
        ("1 s", None),
        ("1s2", None),
        ("s1", None),
        ("1.2.3s", None),
        ("inf", None),
        ("nan", None),
        ("1e400", None),
        ("+1s", None),
    ],
)
def test_parse_duration(text: str, expected: float | None) -> None:
    result = parse_duration(text)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


# -- x-should-retry: false ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "error", "cause"),
    [
        (500, {"message": "boom", "type": "server_error"}, Cause.SERVER_ERROR),
        (429, {"message": "Rate limit reached", "code": "rate_limit_exceeded"},
         Cause.RATE_LIMITED),
    ],
)
def test_a_server_that_says_do_not_retry_is_not_retried_but_the_key_still_cools(
    status: int, error: dict[str, str], cause: Cause
) -> None:
    import wire

    plain = classify(wire.status_error(status, error))
    told = classify(wire.status_error(status, error, {"x-should-retry": "false"}))
    assert plain.action is not Action.RAISE
    assert told.action is Action.RAISE
    assert (told.fate, told.seconds, told.cause) == (plain.fate, plain.seconds, cause)
    again = classify(wire.status_error(status, error, {"x-should-retry": "true"}))
    assert again == plain


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, {"message": "You exceeded your current quota", "code": "insufficient_quota",
               "type": "insufficient_quota"}),
        (401, {"message": "Incorrect API key", "code": "invalid_api_key"}),
        (403, {"message": "unsupported_country_region_territory", "code": "forbidden"}),
    ],
)
def test_a_key_of_its_own_problem_is_still_rotated_away_from_when_told_not_to_retry(
    status: int, error: dict[str, str]
) -> None:
    import wire

    told = classify(wire.status_error(status, error, {"x-should-retry": "false"}))
    assert told == classify(wire.status_error(status, error))
    assert told.action is Action.RETRY_ELSEWHERE
