"""Waiting for a key, in turn: one flow for threads and coroutines, with two thin drivers.

Callers that find no key ready queue in arrival order (:class:`Turns`).  Only the head of the
queue tries for a key; when it gets one it leaves and wakes the next, which then tries in its
turn.  A caller behind the head sleeps until woken (or its own budget runs out).

The flow (:func:`_flow`) is a generator advanced with the owner's lock held.  It yields what
needs the driver, which does it without the lock:

- ``_Wait(seconds)``: sleep until woken or ``seconds`` pass (a ``threading.Condition`` on the
  owner's lock for a thread; a future of its loop for a coroutine);
- ``_ASK``: ask a shared backend for a key (I/O, blocking or awaited); the answer is sent back.

:func:`wait_turn` drives it for threads and :func:`wait_turn_async` for coroutines: those are
the only places where the two differ.  What a try means — which key, how long to wait, when to
give up — is the owner's :class:`Attempt`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Generic, Optional, TypeVar, Union

__all__ = ["Attempt", "Turns", "wait_turn", "wait_turn_async"]

_K = TypeVar("_K")  # what a caller waits for (a key's state)
_P = TypeVar("_P")  # what a shared backend answers (a Pick)


Attempt = Callable[[bool, float, Optional[_P]], tuple[Optional[_K], float]]
"""One try of a queued caller, with the owner's lock held: ``attempt(head, budget, pick)``
(``Attempt[Pick, Key]``).

``head``: whether the caller is first in the queue (only the head may take a key);
``budget``: the seconds it may still wait; ``pick``: a shared backend's answer to the head
(``None``: decide in process).  Returns the key, or ``None`` and the seconds to wait before the
next try.  Raises when waiting cannot help (no keys, all disabled, the budget would run out) —
for a caller behind the head, when its budget is spent.
"""


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waiter:
    """A queued caller: a thread (on a condition sharing the owner's lock) or a coroutine (on
    a future of its loop)."""

    __slots__ = ("condition", "future", "loop")

    def __init__(
        self,
        condition: threading.Condition | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.condition = condition
        self.loop = loop
        self.future: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Wake this caller.  Call with the owner's lock held."""
        if self.condition is not None:
            self.condition.notify()
        elif self.future is not None and self.loop is not None:
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_wake, self.future)


class Turns(collections.deque):  # type: ignore[type-arg]
    """The callers waiting for a key, first come first served.  Guarded by the owner's lock.

    A deque of waiters, so that ``if turns:`` — asked on every call — costs no Python call.
    """

    __slots__ = ()

    def notify(self) -> None:
        """The keys changed: wake the head, to try again.  Lock held."""
        if self:
            self[0].wake()

    def _join(self, waiter: _Waiter) -> None:
        self.append(waiter)

    def _is_head(self, waiter: _Waiter) -> bool:
        return self[0] is waiter

    def _served(self) -> None:
        """The head got its key: it leaves, and the next caller's turn begins."""
        self.popleft()
        self.notify()

    def _leave(self, waiter: _Waiter) -> None:
        """``waiter`` gave up (raised, was cancelled): out of the queue, and if it was the
        head, the next one's turn begins."""
        if self and self[0] is waiter:
            self._served()
        else:
            with contextlib.suppress(ValueError):  # already served
                self.remove(waiter)


class _Wait:
    __slots__ = ("seconds",)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


class _Ask:
    """Ask the shared backend (outside the lock) and send its answer back."""


_ASK = _Ask()
_Step = Union[_Wait, _Ask]


class _Flow(Generic[_K, _P]):
    """What one queued caller needs: its place, its budget, how to try."""

    __slots__ = ("ask_shared", "attempt", "budget", "pick", "turns", "waiter")

    def __init__(
        self,
        turns: Turns,
        waiter: _Waiter,
        attempt: Attempt[_P, _K],
        ask_shared: Callable[[], bool],
        budget: float,
        pick: _P | None,
    ) -> None:
        self.turns = turns
        self.waiter = waiter
        self.attempt = attempt
        self.ask_shared = ask_shared
        self.budget = budget
        self.pick = pick


def _flow(f: _Flow[_K, _P]) -> Generator[_Step, _P | None, tuple[_K, float]]:
    """Queue, take turns, return ``(key, seconds waited)``.  Advanced with the lock held;
    whatever is thrown into it (a failed wait) takes the caller out of the queue."""
    turns, waiter = f.turns, f.waiter
    turns._join(waiter)
    start = time.monotonic()
    pick = f.pick  # a shared backend's answer already had before queueing
    try:
        while True:
            head = turns._is_head(waiter)
            if pick is None and head and f.ask_shared():
                pick = yield _ASK  # only the head asks
            key, wait = f.attempt(head, f.budget - (time.monotonic() - start), pick)
            pick = None
            if key is not None:
                turns._served()
                return key, time.monotonic() - start
            yield _Wait(min(wait, threading.TIMEOUT_MAX))
    except BaseException:
        turns._leave(waiter)
        raise


def wait_turn(
    turns: Turns,
    lock: threading.Lock,
    attempt: Attempt[_P, _K],
    budget: float,
    *,
    ask_shared: Callable[[], bool] = lambda: False,
    shared_choose: Callable[[], _P | None] | None = None,
    pick: _P | None = None,
) -> tuple[_K, float]:
    """Wait for a key in turn, blocking this thread.  ``lock`` is the owner's lock, not held
    by the caller; ``shared_choose`` asks the shared backend (called without the lock)."""
    waiter = _Waiter(condition=threading.Condition(lock))
    with lock:
        flow = _flow(_Flow(turns, waiter, attempt, ask_shared, budget, pick))
        try:
            step = next(flow)
            while True:
                try:
                    if isinstance(step, _Wait):
                        assert waiter.condition is not None
                        waiter.condition.wait(step.seconds)
                        reply = None
                    else:
                        assert shared_choose is not None
                        lock.release()
                        try:
                            reply = shared_choose()
                        finally:
                            lock.acquire()
                except BaseException as exc:  # interrupted while waiting: leave the queue
                    flow.throw(exc)
                    raise AssertionError("the flow re-raises") from exc
                step = flow.send(reply)
        except StopIteration as done:
            result: tuple[_K, float] = done.value
            return result


async def wait_turn_async(
    turns: Turns,
    lock: threading.Lock,
    attempt: Attempt[_P, _K],
    budget: float,
    *,
    ask_shared: Callable[[], bool] = lambda: False,
    shared_choose: Callable[[], Awaitable[_P | None]] | None = None,
    pick: _P | None = None,
) -> tuple[_K, float]:
    """:func:`wait_turn` for coroutines: never blocks the loop, and never holds ``lock``
    across an ``await``."""
    loop = asyncio.get_running_loop()
    waiter = _Waiter(loop=loop)
    flow = _flow(_Flow(turns, waiter, attempt, ask_shared, budget, pick))

    def arm(step: _Step) -> asyncio.Future[None] | None:
        """For a wait, the future a wake() resolves: made in the same hold of the lock as the
        try that decided to wait, so that no wake() can fall between them."""
        if not isinstance(step, _Wait):
            return None
        future: asyncio.Future[None] = loop.create_future()
        waiter.future = future
        return future

    try:
        with lock:
            step = next(flow)
            future = arm(step)
        while True:
            try:
                if future is not None:
                    assert isinstance(step, _Wait)
                    try:
                        await asyncio.wait((future,), timeout=step.seconds)
                    finally:
                        future.cancel()
                    reply = None
                else:
                    assert shared_choose is not None
                    reply = await shared_choose()
            except BaseException as exc:  # cancelled while waiting: leave the queue
                with lock:
                    flow.throw(exc)
                raise AssertionError("the flow re-raises") from exc
            with lock:
                step = flow.send(reply)
                future = arm(step)
    except StopIteration as done:
        result: tuple[_K, float] = done.value
        return result
