"""Pooled ``openai`` clients, one per key (and per event loop for ``AsyncOpenAI``).

A decorated function that declares a ``client`` parameter gets a client bound to the chosen
key: built once, reused by every call and thread (one connection pool per key), with
``max_retries=0`` so that rotation — not same-key retries — handles failures.  Its HTTP
hooks let the ring see what it cannot see through a user's own client: each request's size
in tokens, and each response's ``x-ratelimit-*`` and ``openai-organization`` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import AsyncGenerator
from typing import Any

import openai

from ._budget import read_headers, read_request, usage_tokens
from ._lease import KeyReports, Lease
from ._ring import KeyState

__all__ = ["aclose_clients", "async_client", "close_clients", "sync_client"]


class _Hooks:
    """What the pooled client tells the manager about each request and response."""

    def __init__(self, reports: KeyReports, state: KeyState) -> None:
        self.reports = reports
        self.state = state

    def wait(self, request: Any) -> float:
        """Seconds the request waits before it leaves (see ``KeyReports.before_sending``)."""
        body = _body(request)
        if body is None:
            return 0.0
        read = request.extensions["stable_openai_read"] = read_request(body)
        return self.reports.before_sending(self.state, read[1])

    def request(self, request: Any) -> None:
        read = request.extensions.pop("stable_openai_read", None)
        if read is None:
            body = _body(request)
            if body is None:
                return
            read = read_request(body)
        tokens = read[0]
        request.extensions["stable_openai_tokens"] = tokens
        request.extensions["stable_openai_model"] = read[1]
        request.extensions["stable_openai_marks"] = self.reports.sending(self.state, tokens)

    def response(self, response: Any, read: bool) -> None:
        extensions = response.request.extensions
        estimated = extensions.get("stable_openai_tokens", 0.0)
        # A success's headers tell its pool's budget, and so do a 429's: others (processes
        # that share the key unseen) may have spent it, and a short "try again in" would
        # have every one of them retry into a server that counts rejected requests.
        status = response.status_code
        budget = read_headers(response.headers) if status < 400 or status == 429 else None
        self.reports.answered(
            self.state, budget, extensions.get("stable_openai_marks"),
            extensions.get("stable_openai_model"),
        )
        if read and estimated and self.reports.wants_usage(self.state):
            actual = usage_tokens(response.content)
            if actual is not None:
                self.reports.corrected(self.state, estimated, actual)

    def needs_body(self, response: Any) -> bool:
        return bool(
            self.reports.wants_usage(self.state)
            and response.status_code < 400
            and response.headers.get("content-type", "").startswith("application/json")
        )


def _body(request: Any) -> bytes | None:
    """A request's body; ``None`` for a streamed upload, which is not counted (its size is
    unknown until it has left)."""
    try:
        return bytes(request.content)
    except Exception:
        return None


def _options(state: KeyState) -> dict[str, Any]:
    spec = state.spec
    options: dict[str, Any] = {"api_key": spec.key, "max_retries": 0, **spec.client_options}
    for name in ("base_url", "organization", "project"):
        value = getattr(spec, name)
        if value is not None:
            options[name] = value
    return options


#: Building an ``openai.OpenAI`` takes tens of milliseconds: one thread builds a key's client
#: while the others wait for it, rather than every thread building one and all but one
#: being thrown away.
_building = threading.Lock()
_pruning = threading.Lock()  # the per-loop maps of async clients, while closed loops go


def _after_fork_in_child() -> None:
    """A child forked while another thread built a client would find ``_building`` taken
    for ever (its holder is not in the child): a fresh lock."""
    global _building, _pruning
    _building = threading.Lock()
    _pruning = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: The TLS settings every pooled client shares (``None``: not built yet; ``False``: this
#: ``httpx`` cannot build them apart from a client).  Each ``httpx`` client otherwise builds
#: its own — loading the certificate authorities takes ~50 ms and ~0.85 MiB per key, which
#: is nearly all a pooled client costs; shared, a key's client takes ~0.7 ms and ~26 KiB.
_tls: Any = None
_tls_lock = threading.Lock()


def _http_options() -> dict[str, Any]:
    """What each pooled client's ``httpx`` client is given beside its hooks: the shared TLS
    settings, made once as ``httpx`` makes its default ones (``verify=True``, honouring
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``)."""
    global _tls
    tls = _tls
    if tls is None:
        with _tls_lock:
            tls = _tls
            if tls is None:
                make = getattr(_httpx(), "create_ssl_context", None)  # httpx 0.28+, httpx2
                try:
                    tls = _tls = make() if make is not None else False
                except Exception:  # (not as this httpx builds it: let each client build its own)
                    tls = _tls = False
    return {"verify": tls} if tls is not False else {}


def _httpx() -> Any:
    """The ``httpx`` package this ``openai`` builds its clients on (``httpx2`` for some)."""
    base = openai.DefaultHttpxClient.__mro__[1]
    return sys.modules.get(base.__module__.split(".")[0])


def sync_client(lease: Lease) -> openai.OpenAI:
    """The pooled ``openai.OpenAI`` of the lease's key, built on first use."""
    client = lease.state.clients.get("sync")
    if client is None:
        with _building:
            return _build_sync(lease.owner, lease.state)
    return client  # type: ignore[return-value]


def _build_sync(reports: KeyReports, state: KeyState) -> openai.OpenAI:
    client = state.clients.get("sync")
    if client is None:
        hooks = _Hooks(reports, state)

        def on_request(request: Any) -> None:
            wait = hooks.wait(request)
            if wait > 0:
                time.sleep(wait)
            hooks.request(request)

        def on_response(response: Any) -> None:
            read = hooks.needs_body(response)
            if read:
                response.read()
            hooks.response(response, read)

        options = _options(state)
        if "http_client" not in options:
            options["http_client"] = openai.DefaultHttpxClient(
                event_hooks={"request": [on_request], "response": [on_response]},
                **_http_options(),
            )
        client = state.clients.setdefault("sync", openai.OpenAI(**options))
        reports.probing(state)
    return client  # type: ignore[return-value]


def async_client(lease: Lease) -> openai.AsyncOpenAI:
    """The pooled ``openai.AsyncOpenAI`` of the lease's key for the running event loop."""
    reports, state = lease.owner, lease.state
    loop = asyncio.get_running_loop()
    per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]
    per_loop = state.clients.setdefault("async", weakref.WeakKeyDictionary())  # type: ignore[assignment]
    client = per_loop.get(loop)
    if client is None:
        # Each client holds its loop, so the weak map never lets go of one by itself: the
        # clients of loops that are closed (each asyncio.run() ends with one) go now.
        closers: dict[asyncio.AbstractEventLoop, list[AsyncGenerator[None, None]]]
        closers = state.clients.setdefault("closers", {})  # type: ignore[assignment]
        with _pruning:  # (loops of other threads add theirs meanwhile)
            for closed in [other for other in list(per_loop) if other.is_closed()]:
                per_loop.pop(closed, None)
                closers.pop(closed, None)
        hooks = _Hooks(reports, state)

        async def on_request(request: Any) -> None:
            wait = hooks.wait(request)
            if wait > 0:
                await asyncio.sleep(wait)
            hooks.request(request)

        async def on_response(response: Any) -> None:
            read = hooks.needs_body(response)
            if read:
                await response.aread()
            hooks.response(response, read)

        options = _options(state)
        if "http_client" not in options:
            options["http_client"] = openai.DefaultAsyncHttpxClient(
                event_hooks={"request": [on_request], "response": [on_response]},
                **_http_options(),
            )
        client = per_loop.get(loop)
        if client is None:
            client = per_loop[loop] = openai.AsyncOpenAI(**options)
            if _ours(state):
                # Kept until the loop closes them all: a client close() let go may still
                # serve calls on this loop.
                closers.setdefault(loop, []).append(_close_with_loop(client))
        reports.probing(state)
    return client


async def _closer(client: openai.AsyncOpenAI) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await client.close()


def _close_with_loop(client: openai.AsyncOpenAI) -> AsyncGenerator[None, None]:
    """Close ``client`` when its event loop shuts down (``asyncio.run()`` ends by closing
    the async generators it still has): its connections are the loop's, and can be closed
    only on it.  The generator is started here, without awaiting, so that the loop knows
    it; the caller keeps it (the loop holds it weakly).  A loop closed without that
    shutdown leaves the client to the garbage collector."""
    closer = _closer(client)
    with contextlib.suppress(StopIteration):  # raised when it stands at its yield
        closer.asend(None).send(None)
    return closer


def _ours(state: KeyState) -> bool:
    """Whether the pooled clients' connections are the library's to close: not when the
    user gave ``http_client`` in ``client_options`` (it is theirs, and may serve them)."""
    return "http_client" not in state.spec.client_options


def close_clients(states: list[KeyState]) -> None:
    """Close the pooled sync clients of ``states``; drop their async ones (see aclose).  A
    client on the user's own ``http_client`` is dropped, not closed.  One that calls may be
    using (its key has calls in flight) is closed when the key has none: closed under them,
    their requests would fail, or wait for a read timeout on a dead socket.  New calls get
    a new client either way."""
    for state in states:
        client = state.clients.pop("sync", None)
        if isinstance(client, openai.OpenAI) and _ours(state):
            if state.in_flight:
                state.clients.setdefault("retired", []).append(client)  # type: ignore[attr-defined]
            else:
                client.close()
        # New calls get new async clients; the old ones close with their loops (their
        # closers stay: dropped, they would close the clients under calls still using them).
        state.clients.pop("async", None)
    for state in states:
        close_retired(state)


def close_retired(state: KeyState) -> None:
    """Close the clients :func:`close_clients` retired from ``state`` while calls used them,
    once it has no call in flight (the end of every call on a key that has some asks)."""
    if state.in_flight:
        return
    retired = state.clients.pop("retired", None)
    for client in retired or ():  # type: ignore[attr-defined]
        client.close()


async def aclose_clients(states: list[KeyState]) -> None:
    """Close the pooled clients of ``states``: the sync ones, and the async ones of the
    running loop (their connections belong to it)."""
    loop = asyncio.get_running_loop()
    for state in states:
        per_loop = state.clients.get("async")
        if isinstance(per_loop, weakref.WeakKeyDictionary):
            client = per_loop.pop(loop, None)
            if isinstance(client, openai.AsyncOpenAI) and _ours(state):
                await client.close()
    close_clients([s for s in states if "sync" in s.clients])
