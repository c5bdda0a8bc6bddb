"""stable_openai's contenders, written the way a user would write them.

Used by throughput.py (in its own process with ``--in-process``) and by _external.py (one
subprocess per contender, the default).  Each builder returns a function that runs the timed
loop of _harness and returns its result.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import _harness
import openai

from stable_openai import KeyManager, stable

MODEL = "gpt-4o-mini"
KINDS = ("max0", "default", "pooled", "async")

# (start, deadline, grace, sized, threads, tasks) -> the harness's result
Runner = Callable[[float, float, float, bool, int, int], dict[str, Any]]


def _extra(max_tokens: int | None) -> dict[str, Any]:
    return {} if max_tokens is None else {"max_tokens": max_tokens}


def _messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def pooled_client_mode() -> bool:
    """Whether @stable accepts a function that takes ``client`` instead of ``api_key``."""

    def probe(prompt: str, client: Any) -> None:
        return None

    try:
        stable(probe)
    except TypeError:
        return False
    return True


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def api_key_mode(base_url: str, keys: list[str], retries: bool) -> Runner:
    """User code that builds one ``openai.OpenAI`` per key, with or without its retries."""
    clients: dict[str, openai.OpenAI] = {}
    lock = threading.Lock()

    def client_for(api_key: str) -> openai.OpenAI:
        client = clients.get(api_key)
        if client is None:
            with lock:
                client = clients.get(api_key)
                if client is None:
                    if retries:
                        client = openai.OpenAI(api_key=api_key, base_url=base_url)
                    else:
                        client = openai.OpenAI(api_key=api_key, base_url=base_url,
                                               max_retries=0)
                    clients[api_key] = client
        return client

    @stable
    def ask(text: str, max_tokens: int | None, api_key: str) -> Any:
        response = client_for(api_key).chat.completions.create(
            model=MODEL, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    KeyManager(keys)

    def run(start: float, deadline: float, grace: float, sized: bool, threads: int,
            tasks: int) -> dict[str, Any]:
        try:
            return _harness.run_threads(ask, threads, start, deadline, grace, sized)
        finally:
            for client in list(clients.values()):
                client.close()

    return run


def pooled_mode(base_url: str, keys: list[str]) -> Runner:
    """The library's own per-key clients: the function takes ``client``.  They are told where
    the server is the way the ``openai`` package is, through OPENAI_BASE_URL."""
    if not pooled_client_mode():
        raise LookupError("n/a (not available)")

    def ask(text: str, max_tokens: int | None, client: Any) -> Any:
        response = client.chat.completions.create(
            model=MODEL, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    wrapped = stable(ask)
    KeyManager(keys)

    def run(start: float, deadline: float, grace: float, sized: bool, threads: int,
            tasks: int) -> dict[str, Any]:
        with _environment("OPENAI_BASE_URL", base_url):
            return _harness.run_threads(wrapped, threads, start, deadline, grace, sized)

    return run


def async_mode(base_url: str, keys: list[str]) -> Runner:
    """``async def`` taking a pooled ``client`` (an ``AsyncOpenAI`` per key and loop),
    ``tasks`` coroutines on one loop."""

    @stable
    async def ask(text: str, max_tokens: int | None, client: openai.AsyncOpenAI) -> Any:
        response = await client.chat.completions.create(
            model=MODEL, messages=_messages(text), **_extra(max_tokens))
        return response.choices[0].message.content

    async def main(start: float, deadline: float, grace: float, sized: bool,
                   tasks: int) -> dict[str, Any]:
        try:
            return await _harness.run_coroutines(ask, tasks, start, deadline, grace, sized,
                                                 gate=tasks)
        finally:
            await KeyManager().aclose()

    KeyManager(keys)

    def run(start: float, deadline: float, grace: float, sized: bool, threads: int,
            tasks: int) -> dict[str, Any]:
        with _environment("OPENAI_BASE_URL", base_url):
            return asyncio.run(main(start, deadline, grace, sized, tasks))

    return run


def build(kind: str, base_url: str, keys: list[str]) -> Runner:
    """The runner of contender ``kind`` (one of KINDS); LookupError if it is not available."""
    if kind == "max0":
        return api_key_mode(base_url, keys, retries=False)
    if kind == "default":
        return api_key_mode(base_url, keys, retries=True)
    if kind == "pooled":
        return pooled_mode(base_url, keys)
    if kind == "async":
        return async_mode(base_url, keys)
    raise ValueError(f"unknown kind {kind!r}")


def warm_up(base_url: str, key: str) -> None:
    """One plain call, sync and async, so that lazily loaded modules are not timed."""
    with openai.OpenAI(api_key=key, base_url=base_url, max_retries=0) as client:
        client.chat.completions.create(model=MODEL, messages=_messages("warm up"))

    async def call() -> None:
        async with openai.AsyncOpenAI(api_key=key, base_url=base_url, max_retries=0) as client:
            await client.chat.completions.create(model=MODEL, messages=_messages("warm up"))

    asyncio.run(call())
