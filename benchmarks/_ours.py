"""stable_openai's contenders, written the way a user would write them, one per mode.

Used by _external.py (one subprocess per contender). Each builder returns a function that runs
the timed loop of _harness and returns its result. The server is named the way the ``openai``
package is told, through ``OPENAI_BASE_URL``, so user code reads exactly as against OpenAI.

Modes (MODES):
- ``per_call``: the original README's function: ``api_key`` injected, ``openai.OpenAI(
  api_key=api_key)`` built on every call with the client's default retries;
- ``per_key``: ``api_key`` injected, one ``openai.OpenAI(max_retries=0)`` per key, kept;
- ``pooled``: the function takes ``client``, the library's own per-key clients;
- ``async``: ``async def`` taking ``client`` (an ``AsyncOpenAI`` per key and loop).

The model is an argument of the decorated function in every mode, as in the original README's
``completions_with_backoff(model, messages, api_key)``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any

import _harness
import openai

from stable_openai import KeyManager, stable

MODES = ("per_call", "per_key", "pooled", "async")

# (start, deadline, grace, workload) -> the harness's result
Runner = Callable[[float, float, float, _harness.Workload], dict[str, Any]]


def _extra(max_tokens: int | None) -> dict[str, Any]:
    return {} if max_tokens is None else {"max_tokens": max_tokens}


def _messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def per_call_mode() -> _harness.Call:
    @stable
    def ask(model: str, text: str, max_tokens: int | None, api_key: str) -> Any:
        client = openai.OpenAI(api_key=api_key)
        response = client.chat.completions.create(
            model=model, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    return ask


def per_key_mode() -> _harness.Call:
    clients: dict[str, openai.OpenAI] = {}
    lock = threading.Lock()

    def client_for(api_key: str) -> openai.OpenAI:
        with lock:
            client = clients.get(api_key)
            if client is None:
                client = clients[api_key] = openai.OpenAI(api_key=api_key, max_retries=0)
            return client

    @stable
    def ask(model: str, text: str, max_tokens: int | None, api_key: str) -> Any:
        response = client_for(api_key).chat.completions.create(
            model=model, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    return ask


def pooled_mode() -> _harness.Call:
    @stable
    def ask(model: str, text: str, max_tokens: int | None, client: openai.OpenAI) -> Any:
        response = client.chat.completions.create(
            model=model, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    return ask


def build(mode: str, base_url: str, keys: list[str]) -> Runner:
    """The runner of ``mode`` (one of MODES)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    os.environ["OPENAI_BASE_URL"] = base_url
    KeyManager(keys)

    if mode == "async":
        @stable
        async def ask(model: str, text: str, max_tokens: int | None,
                      client: openai.AsyncOpenAI) -> Any:
            response = await client.chat.completions.create(
                model=model, messages=_messages(text), **_extra(max_tokens))
            return response.choices[0].message.content

        async def main(start: float, deadline: float, grace: float,
                       workload: _harness.Workload) -> dict[str, Any]:
            try:
                return await _harness.run_coroutines(ask, workload, start, deadline, grace)
            finally:
                await KeyManager().aclose()

        def run_async(start: float, deadline: float, grace: float,
                      workload: _harness.Workload) -> dict[str, Any]:
            return asyncio.run(main(start, deadline, grace, workload))

        return run_async

    call = {"per_call": per_call_mode, "per_key": per_key_mode, "pooled": pooled_mode}[mode]()

    def run(start: float, deadline: float, grace: float,
            workload: _harness.Workload) -> dict[str, Any]:
        return _harness.run_threads(call, workload, start, deadline, grace)

    return run


def warm_up(base_url: str, key: str, model: str) -> None:
    """One plain call, sync and async, so that lazily loaded modules are not timed."""
    with openai.OpenAI(api_key=key, base_url=base_url, max_retries=0) as client:
        client.chat.completions.create(model=model, messages=_messages("warm up"))

    async def call() -> None:
        async with openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0) as client:
            await client.chat.completions.create(model=model, messages=_messages("warm up"))

    asyncio.run(call())
