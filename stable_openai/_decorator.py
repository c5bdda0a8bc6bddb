"""``@stable``: one retry flow, with thin drivers for sync, async and streaming functions.

:class:`_Call` holds everything one decorated call knows — attempts made, when it first
failed, the last failure, keys to avoid — and decides after each failure whether to retry, after how
long, or to raise.  The four drivers below differ only in how they wait (``time.sleep`` or
``asyncio.sleep``, a condition or a future) and how they call (return, await, iterate).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import math
import random
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast, overload

from ._clients import async_client, sync_client
from ._errors import AllKeysCoolingError, CallTimeoutError
from ._lease import LaneHeld, Lease
from ._manager import KeyManager, first_lease, lease, lease_async, take_lease
from ._model import PROBE_WAIT
from ._policy import KEY_CAUSES, Action, Policy, classify
from ._ring import KeyState

__all__ = ["stable"]

R = TypeVar("R")


@dataclass(frozen=True)
class _Options:
    attempts: int = 10
    max_wait: float = 120.0
    backoff: float = 0.5
    max_backoff: float = 8.0
    policy: Policy = field(default_factory=Policy)
    manager: KeyManager | None = None
    timeout: float | None = None
    callers_client: bool = False
    """The function takes ``api_key`` and ``client``: a ``client`` its caller passes is the
    caller's own (as with stable-openai 0.1.1), and then only ``api_key`` is injected."""
    model_of: Callable[[tuple[Any, ...], dict[str, Any]], str | None] | None = None
    """The model a call asks for, from its ``model`` argument (when the function has one)."""

    def model_in(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """The model a call with ``args`` and ``kwargs`` asks for, if known."""
        return None if self.model_of is None else self.model_of(args, kwargs)


class _Call:
    """The state of one decorated call across its attempts: the one retry flow that every
    driver follows.  A driver asks it for a lease, makes its attempt, and tells it how the
    attempt ended; it decides whether to retry, after how long, or to raise."""

    # Class-level defaults: a call that succeeds at once never makes a _Call at all.
    attempts = 0
    limited = 0  # rate-limited tries
    dead = 0  # tries that found their key dead (or its project unable to take the request)
    last: BaseException | None = None
    avoid: set[KeyState] | None = None
    tried: set[KeyState] | None = None  # keys of the pools a request did not suit
    backoffs = 0
    out_of_time = False  # the last failure was not retried for want of time
    spread_waited = False  # it waited once for its model's calls in flight (_held)

    def __init__(
        self, options: _Options, manager: KeyManager, deadline: float | None = None,
        model: str | None = None,
    ) -> None:
        self.options = options
        self.manager = manager
        self.model = model  # (its calls are spread over keys: see _manager.take_lease)
        # Made at the call's first failure: from here, waiting, backing off and the tries
        # themselves all spend ``max_wait``.
        self.began = time.monotonic()
        self.deadline = deadline  # the call's ``timeout``, on the monotonic clock

    def left(self) -> float:
        """Seconds of ``max_wait`` left, or until the call's deadline if that is sooner
        (negative once spent)."""
        now = time.monotonic()
        left = self.options.max_wait - (now - self.began)
        deadline = self.deadline
        return left if deadline is None else min(left, deadline - now)

    def acquire(self) -> Lease:
        """A lease: at once when a key is ready, else waiting in turn (blocking)."""
        model = self.model
        taken = take_lease(self.manager, self.avoid, model)
        if taken is None:
            taken, _ = lease(self.manager, self.avoid, self.left(), self.last, model)
        return self._untried(taken)

    async def acquire_async(self) -> Lease:
        """:meth:`acquire` for coroutines."""
        taken, _ = await lease_async(
            self.manager, self.avoid, self.left(), self.last, self.model)
        return self._untried(taken)

    def _untried(self, taken: Lease) -> Lease:
        """``taken``, unless its pool already said the request does not suit it: then no
        other pool is ready, and the call raises what that pool said."""
        if self.tried and taken.state in self.tried and self.last is not None:
            taken.give_back()
            raise self.last
        return taken

    def failed(self, taken: Lease, exc: Exception, *, retry: bool = True) -> float | None:
        """End ``taken`` with ``exc``.  Returns the seconds to wait before the next attempt,
        or ``None`` when the call must raise ``exc``; raises :class:`CallTimeoutError` when it
        would have tried again but its ``timeout`` is spent."""
        self.out_of_time = False
        if isinstance(exc, LaneHeld):
            return self._held(taken, exc)
        delay = self._next(taken, exc, retry)
        deadline = self.deadline  # (it, not max_wait, is what ran out: it comes first)
        if self.out_of_time and deadline is not None and (
            deadline <= self.began + self.options.max_wait
        ):
            raise self.timed_out() from exc
        return delay

    def timed_out(self) -> CallTimeoutError:
        """The error of a call whose ``timeout`` is spent."""
        return _timed_out(self.options, self)

    def _next(self, taken: Lease, exc: Exception, retry: bool) -> float | None:
        """End ``taken`` and decide what :meth:`failed` returns; ``out_of_time`` says when a
        retry was ruled out by time alone."""
        options = self.options
        verdict = classify(exc, options.policy)
        taken.fail(verdict, exc)
        self.last = exc
        if verdict.rate_limited:
            # A rate limit is rotation at work, not a failed attempt: it cools its key and
            # the call moves on at once to a ready key, or waits within max_wait.  Keys that
            # keep answering 429 with no wait would keep it moving for ever: so many tries.
            self.limited += 1
            if self.limited >= _rate_limited_tries(options.attempts, len(self.manager)):
                return None
            if self.left() <= 0:
                self.out_of_time = retry
                return None
        elif verdict.cause in KEY_CAUSES:
            # A key that turns out dead (revoked, no quota, forbidden) leaves the rotation
            # for long: each takes one key out, so good keys after them are tried — at most
            # once per key, within max_wait (a cooldown of 0 brings a key straight back).
            self.dead += 1
            if self.dead > len(self.manager):
                return None
            if self.left() <= 0:
                self.out_of_time = retry
                return None
        else:
            self.attempts += 1
        if not retry or verdict.action is Action.RAISE or self.attempts >= options.attempts:
            return None
        if verdict.action is Action.RETRY_ELSEWHERE:
            return self._now_if_in_time()
        if verdict.action is Action.OTHER_POOL:
            state = taken.state
            # Its project's keys would answer the same: those of a pool given by the user or
            # learned as organization/project.  A pool known only by its organization (from
            # a 429) may span projects: then only this key.
            same = (
                list(state.pool.members)
                if state.spec.pool is not None or "/" in state.pool.name
                else []
            ) or [state]
            self.tried = (self.tried or set()) | set(same)
            self.avoid = (self.avoid or set()) | set(same)
            return self._now_if_in_time()
        # Transient (5xx, timeouts, connection errors): back off, then prefer another key.
        if self.avoid is None:
            self.avoid = set()
        self.avoid.add(taken.state)
        ceiling = min(options.max_backoff, options.backoff * 2.0**self.backoffs)
        self.backoffs += 1
        delay = ceiling * (0.5 + random.random() / 2)  # "equal jitter"
        if delay > self.left():
            self.out_of_time = True
            return None
        return delay

    def _held(self, taken: Lease, exc: LaneHeld) -> float:
        """``taken``'s pool holds the call's model: try a pool that does not, at once; or,
        when every pool holds it, wait for the first to let go, if the call may wait that
        long; else raise ``AllKeysCoolingError``."""
        taken.give_back()  # (nothing was sent)
        again = self.avoid is not None and taken.state in self.avoid
        self.avoid = (self.avoid or set()) | set(taken.state.pool.members)
        free, soonest, ready, daily = self.manager._model_free_in(
            exc.model, self.avoid, taken.state
        )
        if free is None or free > 0:  # every other pool holds it too, or has no key
            self.avoid = None
            if soonest is None and daily:  # held for a day wherever it may go: raise now
                keys = len(self.manager)
                raise AllKeysCoolingError(
                    exc.seconds, keys, {f"{exc.model} held (429, per day)": keys}
                ) from self.last
            wait = exc.seconds if soonest is None else soonest
        elif again and self.model is not None:
            # Taken back to this pool while another serves the model: the keys there have
            # calls of the model in flight, which the choice avoided as much as this one (see
            # _manager._spread).  Wait a moment for one of those calls to end, once; then
            # take one of those keys (found by a test: the call waited for this pool's hold,
            # 30 s, where the other's ended in 50 ms; going at once met 429s beside the call
            # in flight, as before spreading).
            if self.spread_waited:
                self.model = None
                return 0.0
            self.spread_waited = True
            wait = min(PROBE_WAIT, exc.seconds)
        elif again:  # a pool that serves it has no key ready: wait for one, or this hold
            wait = exc.seconds if ready is None else max(0.001, min(ready, exc.seconds))
        else:
            return 0.0
        if wait > self.left():
            keys = len(self.manager)
            raise AllKeysCoolingError(wait, keys, {f"{exc.model} held (429)": keys}) from self.last
        return wait

    def _now_if_in_time(self) -> float | None:
        """Try again at once (``0.0``), unless the call's deadline has passed."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.out_of_time = True
            return None
        return 0.0


def _rate_limited_tries(attempts: int, keys: int) -> int:
    """How many tries of one call may be rate limited: three for each of its ``attempts``,
    two on each key, or ten, whichever is most."""
    return max(3 * attempts, 2 * keys, 10)


def _injected(func: Callable[..., Any]) -> tuple[bool, bool]:
    """Which of ``api_key`` and ``client`` the function takes: ``(api_key, client)``."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return True, False
    name = getattr(func, "__qualname__", repr(func))
    for param_name in ("api_key", "client"):
        param = parameters.get(param_name)
        if param is not None and param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"@stable passes {param_name} by keyword: make it a normal parameter of {name}()"
            )
    wants_key = "api_key" in parameters
    wants_client = "client" in parameters
    if not (wants_key or wants_client):
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            raise TypeError(
                f"@stable needs {name}() to accept an 'api_key' parameter (or a 'client' "
                "parameter, for a pooled openai client): add it to the signature and pass it "
                "on, e.g. openai.OpenAI(api_key=api_key)"
            )
        wants_key = True
    return wants_key, wants_client


def _reject_own_key(
    kwargs: dict[str, Any], func: Callable[..., Any], options: _Options
) -> None:
    for name in ("api_key", "client"):
        if name in kwargs and not (name == "client" and options.callers_client):
            raise TypeError(
                f"{getattr(func, '__qualname__', 'the function')}() got {name} from the "
                "caller; @stable chooses the key itself, so do not pass it"
            )


def _require_asyncio(func: Callable[..., Any]) -> None:
    """Async calls wait and build their clients on asyncio: refuse at once, and say why,
    under another event loop (trio, or anyio on trio) rather than fail only once a call
    must wait."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{getattr(func, '__qualname__', 'this function')}() runs without an asyncio "
            "event loop: @stable's async functions need asyncio (asyncio.run(), or anyio on "
            "its asyncio backend); trio is not supported"
        ) from None


Invoke = Callable[[Lease, tuple[Any, ...], dict[str, Any]], Any]


def _invoker(func: Callable[..., Any], wants_key: bool, wants_client: bool,
             is_async: bool, callers: inspect.Signature | None = None) -> Invoke:
    """How the drivers call ``func`` with a lease: its key as ``api_key``, its pooled client
    as ``client``, or both — unless the caller gave ``client`` to a function that takes
    ``api_key`` too: that client is the caller's, and only the key is given."""
    if not wants_client:
        def with_key(taken: Lease, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return func(*args, **kwargs, api_key=taken.key)

        return with_key
    make = async_client if is_async else sync_client

    if not wants_key:
        callers = None  # a client from the caller is refused (the key is the library's)
    client_at = _positional_index(callers, "client") if callers is not None else None

    def with_client(taken: Lease, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if wants_key and callers is not None:
            if client_at is not None and len(args) > client_at:  # by position: theirs
                bound = callers.bind(*args, **kwargs)
                return func(**bound.arguments, api_key=taken.key)
            if "client" in kwargs:
                if kwargs["client"] is not None:  # by keyword: theirs (None: not given)
                    return func(*args, **kwargs, api_key=taken.key)
                kwargs = {name: value for name, value in kwargs.items() if name != "client"}
        client = make(taken)
        if taken.deadline is not None:  # the call's timeout bounds each of its requests
            left = max(_SHORTEST_TIMEOUT, taken.deadline - time.monotonic())
            client = client.with_options(timeout=left)
        extra: dict[str, Any] = {"client": client}
        if wants_key:
            extra["api_key"] = taken.key
        return func(*args, **kwargs, **extra)

    return with_client


#: The timeout a request is given when its call's deadline has (all but) passed: it fails at
#: once, and the call then raises :class:`CallTimeoutError`.
_SHORTEST_TIMEOUT = 0.001


class _Expired(Exception):
    """An awaited attempt was cancelled at its call's deadline (see :func:`_before`)."""


async def _before(deadline: float, awaitable: Awaitable[R]) -> R:
    """Await ``awaitable``; at ``deadline`` (monotonic clock) cancel it and raise
    :class:`_Expired`.  (``asyncio.timeout`` from Python 3.11 on; here for 3.9 too.)"""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    loop = asyncio.get_running_loop()
    handle = loop.call_later(max(0.0, deadline - time.monotonic()), expire)
    try:
        return await awaitable
    except asyncio.CancelledError:
        if not expired:
            raise
        uncancel = getattr(task, "uncancel", None)  # (3.11+: the cancel was ours)
        if uncancel is not None:
            uncancel()
        raise _Expired from None
    finally:
        handle.cancel()


def _timed_out(options: _Options, call: _Call | None) -> CallTimeoutError:
    return CallTimeoutError(cast(float, options.timeout), None if call is None else call.last)


def _model_reader(
    signature: inspect.Signature,
) -> Callable[[tuple[Any, ...], dict[str, Any]], str | None]:
    """What reads the model a call asks for from its ``model`` argument (``None`` if it is
    no string)."""
    at = _positional_index(signature, "model")
    default = signature.parameters["model"].default

    def model_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        model = args[at] if at is not None and len(args) > at else kwargs.get("model", default)
        return model if isinstance(model, str) else None

    return model_of


def _noting_model(invoke: Invoke, signature: inspect.Signature) -> Invoke:
    """``invoke``, which also tells the lease the model the call asks for — its ``model``
    argument, as in the original README's ``completions_with_backoff(model, messages,
    api_key)`` — so that a pool whose calls ask for several models is not paced from one
    model's 429s."""
    model_of = _model_reader(signature)

    def noting_model(taken: Lease, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        model = model_of(args, kwargs)
        if model is not None:
            taken.model = model
            held = taken.owner.lane_held(taken.state, model, lease=taken)
            if held:
                raise LaneHeld(model, held)
        return invoke(taken, args, kwargs)

    return noting_model


def _positional_index(signature: inspect.Signature, name: str) -> int | None:
    """Where ``name`` stands among the parameters a caller may pass by position (``None``
    when it cannot be, or when a parameter before it is positional-only: then the call
    cannot be made by keywords)."""
    for index, param in enumerate(signature.parameters.values()):
        if param.kind is param.POSITIONAL_ONLY:
            return None
        if param.kind is not param.POSITIONAL_OR_KEYWORD:
            return None
        if param.name == name:
            return index
    return None


#: What a function returns when it is a coroutine function or an async generator function
#: that the decorator could not tell from its definition (a lambda returning a coroutine):
#: the kind of driver the call needs.
_LATE: dict[type, str] = {types.CoroutineType: "async", types.AsyncGeneratorType: "agen"}
# (Not a generator: a plain function may well return one after sending its request.  A
# ``functools.partial`` of a generator function is known when decorating.)


def _kind(func: Callable[..., Any]) -> str:
    """The driver ``func`` needs, from its definition: also an object whose ``__call__`` is
    an ``async def`` or a generator."""
    call = None if inspect.isroutine(func) else inspect.getattr_static(type(func), "__call__", None)
    for candidate in (func, call):
        if candidate is None:
            continue
        if inspect.isasyncgenfunction(candidate):
            return "agen"
        if inspect.isgeneratorfunction(candidate):
            return "gen"
        if inspect.iscoroutinefunction(candidate):
            return "async"
    return "sync"


def _wrap(
    func: Callable[..., Any], options: _Options, kind: str | None = None
) -> Callable[..., Any]:
    wants_key, wants_client = _injected(func)
    kind = kind or _kind(func)
    signature = _callers_signature(func, wants_key, wants_client)
    invoke = _invoker(func, wants_key, wants_client, kind in ("async", "agen"), signature)
    if signature is not None and "model" in signature.parameters:
        invoke = _noting_model(invoke, signature)
        options = dataclasses.replace(options, model_of=_model_reader(signature))
    if wants_key and wants_client:
        options = dataclasses.replace(options, callers_client=True)
    if kind == "agen":
        wrapper = _wrap_async_gen(func, options, invoke)
    elif kind == "gen":
        wrapper = _wrap_gen(func, options, invoke)
    elif kind == "async":
        wrapper = _wrap_async(func, options, invoke)
    else:
        wrapper = _wrap_sync(func, options, invoke)
    if signature is not None:
        wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper


def _callers_signature(
    func: Callable[..., Any], wants_key: bool, wants_client: bool
) -> inspect.Signature | None:
    """The decorated function's signature as its callers see it: without the ``api_key`` and
    ``client`` the decorator passes (a ``client`` the caller may still pass, to a function
    that takes ``api_key`` too, becomes optional)."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    parameters = []
    for param in signature.parameters.values():
        if param.name == "api_key" and wants_key:
            continue
        if param.name == "client" and wants_client:
            if not wants_key:
                continue
            if param.default is param.empty:
                param = param.replace(default=None)
        parameters.append(param)
    try:
        return signature.replace(parameters=parameters)
    except ValueError:  # an optional client before required parameters: leave it as it was
        return None


def _wrap_sync(func: Callable[..., Any], options: _Options, invoke: Invoke) -> Callable[..., Any]:
    late: Callable[..., Any] | None = None  # the driver a coroutine or generator result needs

    @functools.wraps(func)
    def call_with_key(*args: Any, **kwargs: Any) -> Any:
        nonlocal late
        if late is not None:
            return late(*args, **kwargs)
        if "api_key" in kwargs or "client" in kwargs:
            _reject_own_key(kwargs, func, options)
        model = options.model_in(args, kwargs)
        manager, taken = first_lease(options.manager, model)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        call = None
        while True:
            if taken is None:
                call = call or _Call(options, manager, deadline, model)
                taken = call.acquire()
            if deadline is not None:
                taken.deadline = deadline
            try:
                result = invoke(taken, args, kwargs)
            except Exception as exc:
                call = call or _Call(options, manager, deadline, model)
                delay = call.failed(taken, exc)
                if delay is None:
                    raise
                if delay:
                    time.sleep(delay)
                taken = None
                continue
            except BaseException:  # KeyboardInterrupt, SystemExit, ...
                taken.abandon()
                raise
            kind = _LATE.get(type(result))
            if kind is not None:
                # Not run yet: nothing was sent.  This call, and the next, go to the driver
                # that awaits or iterates it, where failures rotate keys as they should.
                try:
                    if kind == "async":
                        result.close()  # (an async generator not started needs nothing)
                finally:
                    taken.give_back()
                late = _wrap(func, options, kind)
                return late(*args, **kwargs)
            taken.succeed()
            return result

    return call_with_key


def _wrap_async(
    func: Callable[..., Awaitable[Any]], options: _Options, invoke: Invoke
) -> Callable[..., Any]:
    @functools.wraps(func)
    async def call_with_key(*args: Any, **kwargs: Any) -> Any:
        _require_asyncio(func)
        if "api_key" in kwargs or "client" in kwargs:
            _reject_own_key(kwargs, func, options)
        model = options.model_in(args, kwargs)
        manager, taken = first_lease(options.manager, model)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        call = None
        while True:
            if taken is None:
                call = call or _Call(options, manager, deadline, model)
                taken = await call.acquire_async()
            try:
                if deadline is None:
                    result = await invoke(taken, args, kwargs)
                else:
                    taken.deadline = deadline
                    result = await _before(deadline, invoke(taken, args, kwargs))
            except _Expired:
                taken.abandon()
                raise _timed_out(options, call) from (None if call is None else call.last)
            except Exception as exc:
                call = call or _Call(options, manager, deadline, model)
                delay = call.failed(taken, exc)
                if delay is None:
                    raise
                if delay:
                    await asyncio.sleep(delay)
                taken = None
                continue
            except BaseException:  # cancelled, KeyboardInterrupt, ...
                taken.abandon()
                raise
            taken.succeed()
            return result

    return call_with_key


def _wrap_gen(
    func: Callable[..., Generator[Any, Any, Any]], options: _Options, invoke: Invoke
) -> Callable[..., Any]:
    @functools.wraps(func)
    def stream_with_key(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        if "api_key" in kwargs or "client" in kwargs:
            _reject_own_key(kwargs, func, options)
        model = options.model_in(args, kwargs)
        manager, taken = first_lease(options.manager, model)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        call = None
        while True:  # until the first item arrives, a failure is retried on another key
            if taken is None:
                call = call or _Call(options, manager, deadline, model)
                taken = call.acquire()
            taken.deadline = deadline
            stream: Generator[Any, Any, Any] | None = None
            try:  # making the stream can fail too (wrong arguments, no client): release
                stream = invoke(taken, args, kwargs)
                first = next(stream)
            except StopIteration as stop:
                taken.succeed()
                return stop.value
            except Exception as exc:
                call = call or _Call(options, manager, deadline, model)
                delay = call.failed(taken, exc)
                if delay is None:
                    raise
                if delay:
                    time.sleep(delay)
                taken = None
                continue
            except BaseException:
                taken.abandon()
                if stream is not None:
                    stream.close()
                raise
            break
        # The stream has started: failures from now on propagate unchanged.
        try:
            yield first
            result = yield from stream
        except Exception as exc:
            (call or _Call(options, manager)).failed(taken, exc, retry=False)
            raise
        except BaseException:  # GeneratorExit when the consumer stops early, and the like
            taken.abandon()
            raise
        taken.succeed()
        return result

    return stream_with_key


def _wrap_async_gen(
    func: Callable[..., AsyncIterator[Any]], options: _Options, invoke: Invoke
) -> Callable[..., Any]:
    @functools.wraps(func)
    async def stream_with_key(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        _require_asyncio(func)
        if "api_key" in kwargs or "client" in kwargs:
            _reject_own_key(kwargs, func, options)
        model = options.model_in(args, kwargs)
        manager, taken = first_lease(options.manager, model)
        deadline = None if options.timeout is None else time.monotonic() + options.timeout
        call = None
        while True:
            if taken is None:
                call = call or _Call(options, manager, deadline, model)
                taken = await call.acquire_async()
            taken.deadline = deadline
            stream: AsyncIterator[Any] | None = None
            try:
                stream = invoke(taken, args, kwargs)
                if deadline is None:
                    first = await stream.__anext__()
                else:
                    first = await _before(deadline, stream.__anext__())
            except StopAsyncIteration:
                taken.succeed()
                return
            except _Expired:
                taken.abandon()
                if stream is not None:
                    await _aclose(stream)
                raise _timed_out(options, call) from (None if call is None else call.last)
            except Exception as exc:
                call = call or _Call(options, manager, deadline, model)
                delay = call.failed(taken, exc)
                if delay is None:
                    raise
                if delay:
                    await asyncio.sleep(delay)
                taken = None
                continue
            except BaseException:
                taken.abandon()
                if stream is not None:
                    await _aclose(stream)
                raise
            break
        assert stream is not None
        try:
            yield first
            async for item in stream:
                yield item
        except Exception as exc:
            (call or _Call(options, manager)).failed(taken, exc, retry=False)
            raise
        except BaseException:
            taken.abandon()
            raise
        else:
            taken.succeed()
        finally:
            await _aclose(stream)

    return stream_with_key


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _number(name: str, value: object, *, minimum: float, integer: bool = False) -> None:
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"stable({name}=...) must be {kind}, not {type(value).__name__}")
    number = float(cast(float, value))
    if math.isnan(number) or number < minimum:
        raise ValueError(f"stable({name}=...) must be >= {minimum}")


# The wrapper takes every argument but api_key, which typing cannot subtract from a signature:
# the decorated function is typed as taking any arguments and returning what it returned.
@overload
def stable(func: Callable[..., R], /) -> Callable[..., R]: ...


@overload
def stable(
    *,
    attempts: int = ...,
    max_wait: float = ...,
    cooldown: float = ...,
    quota_cooldown: float = ...,
    forbidden_cooldown: float = ...,
    revoked_cooldown: float = ...,
    backoff: float = ...,
    max_backoff: float = ...,
    manager: KeyManager | None = ...,
    timeout: float | None = ...,
) -> Callable[[Callable[..., R]], Callable[..., R]]: ...


def stable(
    func: Callable[..., Any] | None = None,
    /,
    *,
    attempts: int = 10,
    max_wait: float = 120.0,
    cooldown: float = 20.0,
    quota_cooldown: float = 3600.0,
    forbidden_cooldown: float = 600.0,
    revoked_cooldown: float = 3600.0,
    backoff: float = 0.5,
    max_backoff: float = 8.0,
    manager: KeyManager | None = None,
    timeout: float | None = None,
) -> Any:
    """Give the decorated function a healthy ``api_key`` on every call, and retry on failures.

    Use as ``@stable`` or ``@stable(attempts=..., ...)``.  The function must accept an
    ``api_key`` parameter; it may be a plain function, an ``async def``, or a (async)
    generator for streaming.

    :param attempts: failed calls at most, across all keys, before the last error is raised;
        rate-limited calls do not count (they cool their key; a call makes at most three
        rate-limited tries per attempt, two per key or ten, whichever is most, within
        ``max_wait``),
        nor do calls that find their key dead (revoked, no quota, forbidden: each takes one
        key out of the rotation).
    :param max_wait: seconds a call may spend retrying, counted from its first failure:
        waiting for a key, backing off, and the tries themselves.
    :param cooldown: seconds to cool a rate-limited key when the server gives no delay.
    :param quota_cooldown: seconds to bench a key whose quota is empty.
    :param forbidden_cooldown: seconds to bench a key that got 403.
    :param revoked_cooldown: seconds a key disabled by a 401 stays out before one call tries
        it again (a provider's passing trouble); ``math.inf``: until it is given again.
    :param backoff: first backoff, in seconds, after a server or connection error.
    :param max_backoff: the longest backoff.
    :param manager: a specific KeyManager (default: the singleton).
    :param timeout: seconds a call may take in all, from its start (``None``: no limit).
        No try starts after it, and a call that would try again raises
        :class:`~stable_openai.CallTimeoutError`; each request of a pooled ``client`` is
        given what is left as its timeout, and an ``async`` call is cancelled at it.  A sync
        function's own request (``api_key``) runs to its end: give your client a timeout
        too.  A stream is timed until its first item.
    """
    _number("attempts", attempts, minimum=1, integer=True)
    for name, value in (
        ("max_wait", max_wait), ("cooldown", cooldown), ("quota_cooldown", quota_cooldown),
        ("forbidden_cooldown", forbidden_cooldown), ("revoked_cooldown", revoked_cooldown),
        ("backoff", backoff),
        ("max_backoff", max_backoff),
    ):
        _number(name, value, minimum=0)
    if timeout is not None:
        _number("timeout", timeout, minimum=0)
        if not timeout:
            raise ValueError("stable(timeout=...) must be > 0, or None for no limit")
    if manager is not None and not isinstance(manager, KeyManager):
        raise TypeError(f"stable(manager=...) must be a KeyManager, not {type(manager).__name__}")
    options = _Options(
        attempts=attempts, max_wait=float(max_wait), backoff=float(backoff),
        max_backoff=float(max_backoff),
        policy=Policy(
            float(cooldown), float(quota_cooldown), float(forbidden_cooldown),
            float(revoked_cooldown),
        ),
        manager=manager, timeout=None if timeout is None else float(timeout),
    )
    if func is None:
        return lambda f: _decorate(f, options)
    return _decorate(func, options)


def _decorate(func: Any, options: _Options) -> Any:
    """``func`` decorated; above ``@staticmethod`` or ``@classmethod``, the function inside,
    wrapped and given back the same kind (else a static method became an instance method)."""
    if isinstance(func, (staticmethod, classmethod)):
        return type(func)(_decorate(func.__func__, options))
    if not callable(func):
        raise TypeError(
            f"@stable decorates a function, not {type(func).__name__}; "
            "options go by keyword: @stable(attempts=5)"
        )
    return _wrap(func, options)
