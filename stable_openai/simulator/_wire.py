"""Pure helpers that shape what the simulator puts on the wire.

Everything here is free of I/O and state so it can be tested directly: key masking, Go-style
durations, token accounting, OpenAI-style error bodies and the deterministic answers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
import time
import uuid
from typing import Any

from .._keys import mask

JSON = dict[str, Any]

RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"
API_KEYS_URL = "https://platform.openai.com/account/api-keys"
DEFAULT_MAX_TOKENS = 16
"""Completion tokens a chat request reserves when it names neither max_completion_tokens nor
max_tokens (the same default the legacy completions endpoint used)."""

MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small")


# --------------------------------------------------------------------------- keys


def key_label(key: str) -> str:
    """Short form of a key for stats and logs: the library's own masking (``sk-…WXYZ``), so a
    key reads the same in the simulator's counters as in ``KeyManager.stats()``."""
    return mask(key)


def key_fingerprint(key: str) -> str:
    """A short one-way fingerprint, used only to tell apart keys whose labels collide."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:6]


def mask_key_401(key: str) -> str:
    """The key as the real service prints it in a 401: ``sk-abc**********wxyz``."""
    n = len(key)
    if n >= 14:
        return key[:6] + "*" * (n - 10) + key[-4:]
    if n >= 8:
        return key[:2] + "*" * (n - 4) + key[-2:]
    return "*" * n


# --------------------------------------------------------------------------- durations


def _ceil_ms(seconds: float) -> int:
    """Whole milliseconds, rounded up (so a client that waits this long is never early)."""
    if seconds <= 0:
        return 0
    return math.ceil(round(seconds * 1000.0, 6))


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration.String`` at millisecond precision (rounded up).

    Examples: ``0s``, ``12ms``, ``1s``, ``9.816s``, ``1m30.5s``, ``6m0s``, ``1h0m0s``. This is
    the format of OpenAI's ``x-ratelimit-reset-*`` headers and "Please try again in ..." texts.
    """
    ms = _ceil_ms(seconds)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rem = divmod(ms, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, frac = divmod(rem, 1000)
    sec_text = str(secs)
    if frac:
        sec_text += "." + f"{frac:03d}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


def retry_after_seconds(seconds: float) -> int:
    """Value of a ``retry-after`` header: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(round(seconds, 6)))


def retry_after_ms(seconds: float) -> int:
    """Value of a ``retry-after-ms`` header: whole milliseconds, rounded up, at least 1."""
    return max(1, _ceil_ms(seconds))


# --------------------------------------------------------------------------- ids


def new_request_id() -> str:
    """A unique ``x-request-id`` in the real service's shape."""
    return "req_" + uuid.uuid4().hex


# --------------------------------------------------------------------------- content


def content_text(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    return ""


def echo_answer(text: str) -> str:
    """The deterministic reply to a chat whose last user message is ``text``."""
    return "echo: " + text


def last_user_text(messages: list[JSON]) -> str:
    """Text of the last message with role "user" ("" if none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def tokens_for_chars(chars: int) -> int:
    """The simulator's tokenizer: one token per 4 characters, rounded up."""
    return (chars + 3) // 4


def chat_prompt_tokens(messages: list[JSON]) -> int:
    """Prompt tokens of a chat request: ceil(total chars of all message contents / 4)."""
    return tokens_for_chars(sum(len(content_text(m.get("content"))) for m in messages))


def chat_request_cost(messages: list[JSON], max_tokens: int | None) -> int:
    """Tokens a chat request charges against TPM: prompt tokens plus the completion budget.

    The completion budget is ``max_completion_tokens`` or ``max_tokens`` or 16, as the real
    service reserves the requested maximum when it admits a request.
    """
    budget = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return chat_prompt_tokens(messages) + budget


def split_stream_content(content: str) -> list[str]:
    """Split a reply into at least two pieces (word by word) whose concatenation is ``content``."""
    pieces = [p for p in re.findall(r"\S*\s*", content) if p]
    if len(pieces) < 2:
        whole = pieces[0] if pieces else content
        half = max(1, len(whole) // 2)
        pieces = [whole[:half], whole[half:]]
    return pieces


def embedding_vector(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit vector of ``dims`` floats derived from a hash of ``text``."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    while len(digest) < dims * 2:
        digest += hashlib.sha256(digest).digest()
    raw = [(int.from_bytes(digest[2 * i : 2 * i + 2], "big") / 32767.5) - 1.0 for i in range(dims)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def encode_embedding_base64(vector: list[float]) -> str:
    """The ``encoding_format="base64"`` form: little-endian float32s, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


# --------------------------------------------------------------------------- bodies


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> JSON:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid_api_key_body(key: str) -> JSON:
    """401 for a revoked or unknown key, with the key masked as the real service does."""
    return error_body(
        f"Incorrect API key provided: {mask_key_401(key)}. "
        f"You can find your API key at {API_KEYS_URL}.",
        "invalid_request_error",
        "invalid_api_key",
    )


def missing_api_key_body() -> JSON:
    """401 for a request without ``Authorization: Bearer ...``."""
    return error_body(
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). "
        f"You can obtain an API key from {API_KEYS_URL}.",
        "invalid_request_error",
        None,
    )


def insufficient_quota_body() -> JSON:
    """429 for a key whose account has no quota left (waiting does not help)."""
    return error_body(
        "You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    )


def forbidden_body() -> JSON:
    """403 as sent to a caller from an unsupported region."""
    return {
        "error": {
            "code": "unsupported_country_region_territory",
            "message": "Country, region, or territory not supported",
            "param": None,
            "type": "request_forbidden",
        }
    }


LIMIT_NAMES = {
    "rpm": ("requests", "requests per min (RPM)"),
    "tpm": ("tokens", "tokens per min (TPM)"),
    "rpd": ("requests", "requests per day (RPD)"),
    "tpd": ("tokens", "tokens per day (TPD)"),
}
"""For each limit kind: what it counts (the 429's ``type``) and how OpenAI's messages name it."""

BILLING_URL = "https://platform.openai.com/account/billing"


def rate_limit_body(
    model: str, org: str, kind: str, limit: int, used: int, requested: int, wait: float
) -> JSON:
    """OpenAI's 429 rate_limit_exceeded for one limit (``kind``: rpm, tpm, rpd or tpd)."""
    counts, name = LIMIT_NAMES[kind]
    message = (
        f"Rate limit reached for {model} in organization {org} on {name}: Limit {limit}, "
        f"Used {used}, Requested {requested}. Please try again in {go_duration(wait)}. "
        f"Visit {RATE_LIMITS_URL} to learn more."
    )
    if kind == "rpd":
        message += (
            " You can increase your rate limit by adding a payment method to your account at "
            f"{BILLING_URL}."
        )
    return error_body(message, counts, "rate_limit_exceeded")


def azure_rate_limit_body(operation: str, kind: str, wait: float) -> JSON:
    """Azure OpenAI's 429: ``code`` is the string "429", there is no ``type``, and the wait is
    in whole seconds, rounded up."""
    what = "token rate limit" if LIMIT_NAMES[kind][0] == "tokens" else "call rate limit"
    return {
        "error": {
            "code": "429",
            "message": f"Requests to the {operation} Operation under Azure OpenAI API version "
            f"2024-02-15-preview have exceeded {what} of your current OpenAI S0 pricing tier. "
            f"Please retry after {retry_after_seconds(wait)} seconds. Please go here: "
            "https://aka.ms/oai/quotaincrease if you would like to further increase the "
            "default rate limit.",
        }
    }


def openrouter_rate_limit_body() -> JSON:
    """OpenRouter's 429: an integer ``code`` and no numbers at all."""
    return {
        "error": {
            "code": 429,
            "message": "Rate limit exceeded",
            "metadata": {"error_type": "rate_limit_exceeded"},
        }
    }


def gemini_rate_limit_body() -> list[JSON]:
    """Gemini's OpenAI-compatible 429: a JSON *array* holding one error, no numbers."""
    return [
        {
            "error": {
                "code": 429,
                "message": "Resource has been exhausted (e.g. check quota).",
                "status": "RESOURCE_EXHAUSTED",
            }
        }
    ]


def profile_rate_limit_body(
    profile: str,
    operation: str,
    model: str,
    org: str,
    kind: str,
    limit: int,
    used: int,
    requested: int,
    wait: float,
) -> Any:
    """The 429 body for a broken limit, in the style of ``profile`` (see ``PROFILES``)."""
    if profile == "azure":
        return azure_rate_limit_body(operation, kind, wait)
    if profile == "openrouter":
        return openrouter_rate_limit_body()
    if profile == "gemini":
        return gemini_rate_limit_body()
    return rate_limit_body(model, org, kind, limit, used, requested, wait)


BudgetLine = tuple[str, int, int, float]
"""One limit as the budget headers show it: (requests|tokens, limit, remaining, reset s)."""


def budget_headers(profile: str, lines: list[BudgetLine]) -> list[tuple[str, str]]:
    """``x-ratelimit-*`` headers as ``profile`` sends them: all three per limit for
    ``openai``, only ``remaining`` for ``azure``, none for the others."""
    out: list[tuple[str, str]] = []
    if profile not in ("openai", "azure"):
        return out
    for counts, limit, remaining, reset in lines:
        if profile == "openai":
            out.append((f"x-ratelimit-limit-{counts}", str(limit)))
        out.append((f"x-ratelimit-remaining-{counts}", str(remaining)))
        if profile == "openai":
            out.append((f"x-ratelimit-reset-{counts}", go_duration(reset)))
    return out


def retry_headers(wait: float, *, seconds: bool, ms: bool) -> list[tuple[str, str]]:
    """``retry-after`` (whole seconds, rounded up) and/or ``retry-after-ms``."""
    out: list[tuple[str, str]] = []
    if seconds:
        out.append(("retry-after", str(retry_after_seconds(wait))))
    if ms:
        out.append(("retry-after-ms", str(retry_after_ms(wait))))
    return out


def too_large_body(model: str, org: str, limit: int, requested: int, kind: str = "tpm") -> JSON:
    """429 for a request that needs more tokens than the whole limit (never admissible)."""
    return error_body(
        f"Request too large for {model} in organization {org} on {LIMIT_NAMES[kind][1]}: "
        f"Limit {limit}, Requested {requested}. The input or output tokens must be reduced in "
        f"order to run successfully. Visit {RATE_LIMITS_URL} to learn more.",
        "tokens",
        "rate_limit_exceeded",
    )


def server_error_body(request_id: str) -> JSON:
    """500 server_error."""
    return error_body(
        "The server had an error processing your request. Sorry about that! You can retry your "
        "request, or contact us through our help center at help.openai.com if you keep seeing "
        f"this error. (Please include the request ID {request_id} in your email.)",
        "server_error",
        None,
    )


def overloaded_body(request_id: str) -> JSON:
    """503 "model overloaded"."""
    return error_body(
        "That model is currently overloaded with other requests. You can retry your request, "
        "or contact us through our help center at help.openai.com if the error persists. "
        f"(Please include the request ID {request_id} in your message.)",
        "server_error",
        None,
    )


def invalid_url_body(method: str, path: str) -> JSON:
    """404 for a path the simulator does not serve (same text as the real service)."""
    return error_body(f"Invalid URL ({method} {path})", "invalid_request_error", None)


def invalid_json_body() -> JSON:
    """400 for a body that is not valid JSON."""
    return error_body(
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
        "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
        "sent was not valid JSON.)",
        "invalid_request_error",
        None,
    )


def bad_param_body(message: str, param: str | None, code: str | None = None) -> JSON:
    """400 for a missing or ill-typed parameter."""
    return error_body(message, "invalid_request_error", code, param)


# --------------------------------------------------------------------------- answers


def chat_completion(model: str, messages: list[JSON]) -> JSON:
    """A complete ``chat.completion`` object echoing the last user message."""
    reply = echo_answer(last_user_text(messages))
    prompt = chat_prompt_tokens(messages)
    completion = tokens_for_chars(len(reply))
    return {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_simulator",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def chat_chunks(model: str, messages: list[JSON], include_usage: bool) -> list[JSON]:
    """The ``chat.completion.chunk`` objects of a streamed answer (without ``[DONE]``)."""
    reply = echo_answer(last_user_text(messages))
    prompt = chat_prompt_tokens(messages)
    completion = tokens_for_chars(len(reply))
    chunk_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())

    def chunk(delta: JSON, finish: str | None) -> JSON:
        out: JSON = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_simulator",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if include_usage:
            out["usage"] = None
        return out

    chunks = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    chunks.extend(chunk({"content": piece}, None) for piece in split_stream_content(reply))
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append(
            {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_simulator",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                },
            }
        )
    return chunks


def embeddings_response(model: str, inputs: list[str], tokens: int, as_base64: bool) -> JSON:
    """A ``list`` of ``embedding`` objects, one per input, in order."""
    data: list[JSON] = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_embedding_base64(vector) if as_base64 else vector,
            }
        )
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def models_response() -> JSON:
    """``GET /v1/models``: a few model ids."""
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for name in MODELS
        ],
    }
