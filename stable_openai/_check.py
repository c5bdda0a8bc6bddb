"""``stable-openai check``: is each of my keys usable, and what limits does it have?

One tiny request per key (a one-token chat completion, or only a model list with
``--models-only``) against the real API or any ``--base-url``.  One masked row per key.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import openai

from ._keys import split_keys
from ._policy import Fate, classify
from ._ring import mask, normalize_keys

USABLE = ("valid", "rate-limited")


@dataclass(frozen=True)
class KeyCheck:
    """What one request told about one key."""

    key: str  # masked
    status: str  # valid / revoked / no quota / rate-limited / forbidden / unreachable / error
    organization: str = ""
    requests_limit: str = ""
    tokens_limit: str = ""
    detail: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="*", metavar="KEY", help="API keys to check")
    parser.add_argument(
        "--file", help="a file with one key per line (# comments allowed); '-' reads stdin"
    )
    parser.add_argument("--base-url", help="API base URL (default: OPENAI_BASE_URL or OpenAI)")
    parser.add_argument("--model", default="gpt-4o-mini", help="model for the test request")
    parser.add_argument(
        "--models-only", action="store_true",
        help="only list models (costs nothing, but cannot see quota or limits)",
    )
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per request")


def _read_keys(args: argparse.Namespace) -> list[str]:
    raw: list[str] = list(args.keys)
    if args.file:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as handle:
                text = handle.read()
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                raw.append(line)
    if not raw:
        for name in ("OPENAI_API_KEYS", "OPENAI_API_KEY"):
            raw = split_keys(os.environ.get(name, ""), name)
            if raw:
                break
    return [key.key for key in normalize_keys(raw, "keys")]


def check_key(key: str, base_url: str | None, model: str, models_only: bool,
              timeout: float) -> KeyCheck:
    masked = mask(key)
    client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=timeout)
    try:
        if models_only:
            headers = client.models.with_raw_response.list().headers
        else:
            headers = client.chat.completions.with_raw_response.create(
                model=model, max_tokens=1, messages=[{"role": "user", "content": "ping"}]
            ).headers
        return KeyCheck(
            masked, "valid", headers.get("openai-organization", ""),
            headers.get("x-ratelimit-limit-requests", ""),
            headers.get("x-ratelimit-limit-tokens", ""),
        )
    except openai.APIConnectionError:
        return KeyCheck(masked, "unreachable", detail="no answer from the server")
    except openai.APIStatusError as exc:
        headers = exc.response.headers
        org = headers.get("openai-organization", "")
        verdict = classify(exc)
        if exc.status_code == 401:
            status = "revoked"
        elif exc.status_code == 403:
            status = "forbidden"
        elif verdict.fate is Fate.COOL and not verdict.rate_limited:
            status = "no quota"
        elif verdict.rate_limited:
            status = "rate-limited"
        else:
            status = "error"
        return KeyCheck(
            masked, status, org, headers.get("x-ratelimit-limit-requests", ""),
            headers.get("x-ratelimit-limit-tokens", ""), f"HTTP {exc.status_code}",
        )
    finally:
        client.close()


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        keys = _read_keys(args)
    except (OSError, TypeError, ValueError) as exc:
        print(f"stable-openai check: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.timeout <= 600:
        print("stable-openai check: --timeout must be between 0 and 600 seconds", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=min(8, len(keys))) as pool:
        rows = list(pool.map(
            lambda key: check_key(key, args.base_url, args.model, args.models_only, args.timeout),
            keys,
        ))
    _print_table(rows, out)
    usable = sum(row.status in USABLE for row in rows)
    print(f"{usable} of {len(rows)} key(s) usable", file=out)
    return 0 if usable == len(rows) else 1


def _print_table(rows: Sequence[KeyCheck], out: TextIO) -> None:
    header = ("key", "status", "organization", "RPM limit", "TPM limit", "detail")
    table = [header] + [
        (r.key, r.status, r.organization, r.requests_limit, r.tokens_limit, r.detail)
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
