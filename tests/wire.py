"""Real ``openai`` exceptions built the way the client builds them, from real HTTP responses."""

from __future__ import annotations

import itertools
import json
from typing import Any

import openai

try:  # openai >= 3 ships on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

_CLIENT = openai.OpenAI(api_key="sk-wire-made-up-0000000000", base_url="http://127.0.0.1:9/v1")
URL = "http://127.0.0.1:9/v1/chat/completions"


def request() -> Any:
    return httpx.Request("POST", URL)


def status_error(
    status: int,
    error: dict[str, Any] | str | None = None,
    headers: dict[str, str] | None = None,
) -> openai.APIStatusError:
    """The exception ``openai`` raises for this status, body and headers."""
    if isinstance(error, dict):
        content = json.dumps({"error": error}).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    else:
        content = (error or "").encode()
    response = httpx.Response(status, headers=headers or {}, content=content, request=request())
    return _CLIENT._make_status_error_from_response(response)


_ORGS = itertools.count(1)


def rate_limited(
    delay: str = "20s",
    headers: dict[str, str] | None = None,
    organization: str | None = None,
    numbers: str = "Limit 3, Used 3, Requested 1",
    model: str = "gpt-4o-mini",
    per: str = "min (RPM)",
) -> openai.APIStatusError:
    """A 429 rate limit; its message names ``organization`` (by default a new one each time,
    so that keys are not taken for one pool unless a test says so) and gives ``numbers``
    (with ``delay``, the rate the limit refills at: here one request per ``delay``); ``per``:
    ``"day (RPD)"`` for a daily limit."""
    organization = organization or f"org-wire{next(_ORGS):06d}"
    return status_error(
        429,
        {
            "message": f"Rate limit reached for {model} in organization {organization} on "
            f"requests per {per}: {numbers}. Please try again in {delay}. "
            "Visit https://platform.openai.com/account/rate-limits to learn more.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        headers,
    )


def too_large() -> openai.APIStatusError:
    return status_error(
        429,
        {
            "message": "Request too large for gpt-4o in organization org-sim on tokens per min "
            "(TPM): Limit 30000, Requested 50000. The input or output tokens must be reduced.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        },
    )


def model_not_found() -> openai.APIStatusError:
    return status_error(404, {
        "message": "The model `gpt-4o` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "code": "model_not_found",
    })


def no_quota() -> openai.APIStatusError:
    return status_error(
        429,
        {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
    )


def revoked() -> openai.APIStatusError:
    return status_error(
        401,
        {
            "message": "Incorrect API key provided: sk-abc**********wxyz. You can find your API "
            "key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        },
    )


def forbidden() -> openai.APIStatusError:
    return status_error(
        403,
        {
            "code": "unsupported_country_region_territory",
            "message": "Country, region, or territory not supported",
            "param": None,
            "type": "request_forbidden",
        },
    )


def server_error(status: int = 500) -> openai.APIStatusError:
    return status_error(
        status,
        {
            "message": "The server had an error processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    )


def bad_request(status: int = 400) -> openai.APIStatusError:
    return status_error(
        status,
        {
            "message": "Invalid value for 'messages'.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        },
    )


def connection_error() -> openai.APIConnectionError:
    return openai.APIConnectionError(request=request())


def timeout_error() -> openai.APITimeoutError:
    return openai.APITimeoutError(request=request())


def made_up_keys(count: int, tag: str = "test") -> list[str]:
    """Distinctive fake keys, long enough to be masked like real ones."""
    return [f"sk-{tag}-{index:04d}-MADEUP{index * 7919:012d}" for index in range(count)]
