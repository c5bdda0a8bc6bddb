"""The workload and the timed loop shared by throughput.py and its subprocess workers.

Standard library only: the workers run in virtual environments that have neither this
project nor its simulator installed, so the simulator's two rules the workload depends on are
replicated here (throughput.py checks them against the simulator at start-up):

- the answer to a chat whose last user message is ``text`` is ``"echo: " + text``;
- a chat request costs ``ceil(chars of the message contents / 4) + max_tokens`` tokens
  (``max_tokens`` defaults to 16 when the request does not send one).

Times are wall-clock (``time.time()``) so that a subprocess can be told when to start and stop.
A workload is a list of ``(model, workers)``: that many threads (or coroutines) call that model.
A record is ``[ok, latency_ms, end_s, tokens, model_index]``: ``end_s`` is when the call
returned, in seconds after the start; ``tokens`` is the request's cost when it succeeded, else
0; ``model_index`` is the position of the call's model in the workload.

A worker whose call raised an error that says when to try again (a ``retry_after`` attribute
of seconds, as stable_openai's ``AllKeysCoolingError``) waits that long, or until the end of
the run, before its next call, as a program would; other errors are followed at once by the
next call (an async worker first lets the loop run).  Without that wait, workers whose calls
all fail at once spin, and take the processor from the calls that can succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional

DEFAULT_MAX_TOKENS = 16

# Scenario (c): prompt lengths and max_tokens cycle with co-prime periods (10 and 7), so the
# 70 combinations recur in a fixed order; the dearest costs 800/4 + 128 = 328 tokens.
SIZED_LENGTHS = (40, 800, 120, 560, 240, 680, 360, 80, 440, 200)
SIZED_MAX_TOKENS = (16, 128, 32, 96, 64, 48, 112)

Call = Callable[[str, str, Optional[int]], Any]  # (model, text, max_tokens) -> answer
AsyncCall = Callable[[str, str, Optional[int]], Awaitable[Any]]
Record = list[float]
Workload = list[tuple[str, int]]


def versions(*names: str) -> dict[str, str]:
    """The installed version of each of ``names`` that is installed (for a run's record)."""
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def prompt(i: int, sized: bool) -> tuple[str, int | None]:
    """The message content and ``max_tokens`` of call number ``i``."""
    text = f"call {i}"
    if not sized:
        return text, None
    length = SIZED_LENGTHS[i % len(SIZED_LENGTHS)]
    text = (text + " " + "lorem ipsum dolor sit amet " * 40)[:length]
    return text, SIZED_MAX_TOKENS[i % len(SIZED_MAX_TOKENS)]


def expected(text: str) -> str:
    """The simulator's answer to ``text`` (stable_openai.simulator.echo_answer)."""
    return "echo: " + text


def request_tokens(text: str, max_tokens: int | None) -> int:
    """Tokens the simulator charges for a one-message chat request."""
    budget = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return (len(text) + 3) // 4 + budget


class _Tally:
    """Records of one run, appended from many threads or coroutines."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.records: list[Record] = []
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()

    def add(self, index: int, text: str, max_tokens: int | None, began: float, answer: Any,
            error: BaseException | None) -> None:
        ended = time.time()
        ok = error is None and answer == expected(text)
        tokens = request_tokens(text, max_tokens) if ok else 0
        record = [1 if ok else 0, round((ended - began) * 1000, 2), round(ended - self.start, 4),
                  tokens, index]
        with self.lock:
            self.records.append(record)
            if error is not None:
                self.errors[type(error).__name__] += 1
            elif not ok:
                self.errors["wrong answer: None" if answer is None else "wrong answer"] += 1

    def result(self, unfinished: int) -> dict[str, Any]:
        with self.lock:
            return {"records": list(self.records), "unfinished": unfinished,
                    "errors": dict(self.errors)}


def _told_wait(exc: BaseException, deadline: float) -> float:
    """Seconds to wait after ``exc`` before the next call (see the module docstring)."""
    after = getattr(exc, "retry_after", None)
    if not isinstance(after, (int, float)) or isinstance(after, bool) or not after > 0:
        return 0.0
    return max(0.0, min(float(after), deadline - time.time()))


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


def _assignments(workload: Workload) -> list[tuple[int, str]]:
    """One ``(model_index, model)`` per worker."""
    return [(index, model) for index, (model, workers) in enumerate(workload)
            for _ in range(workers)]


def run_threads(call: Call, workload: Workload, start: float, deadline: float, grace: float,
                sized: bool = False) -> dict[str, Any]:
    """Threads loop ``call`` from ``start`` until ``deadline`` (wall-clock), as many per model
    as ``workload`` says.

    A call begun before the deadline is let finish; threads still busy ``grace`` seconds
    after the deadline are counted as unfinished and left behind (they are daemons).
    """
    tally = _Tally(start)
    numbers = itertools.count()

    def loop(index: int, model: str) -> None:
        _sleep_until(start)
        while time.time() < deadline:
            text, max_tokens = prompt(next(numbers), sized)
            began = time.time()
            try:
                answer = call(model, text, max_tokens)
            except Exception as exc:
                tally.add(index, text, max_tokens, began, None, exc)
                time.sleep(_told_wait(exc, deadline))
            else:
                tally.add(index, text, max_tokens, began, answer, None)

    workers = [threading.Thread(target=loop, args=job, daemon=True, name=f"bench-{n}")
               for n, job in enumerate(_assignments(workload))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(max(0.0, deadline + grace - time.time()))
    return tally.result(sum(worker.is_alive() for worker in workers))


async def run_coroutines(call: AsyncCall, workload: Workload, start: float, deadline: float,
                         grace: float, sized: bool = False) -> dict[str, Any]:
    """:func:`run_threads` for coroutines on the running loop.

    Tasks still busy ``grace`` seconds after the deadline are cancelled and counted as
    unfinished.
    """
    tally = _Tally(start)
    numbers = itertools.count()

    async def loop(index: int, model: str) -> None:
        await asyncio.sleep(max(0.0, start - time.time()))
        while time.time() < deadline:
            text, max_tokens = prompt(next(numbers), sized)
            began = time.time()
            try:
                answer = await call(model, text, max_tokens)
            except Exception as exc:
                tally.add(index, text, max_tokens, began, None, exc)
                await asyncio.sleep(_told_wait(exc, deadline))
            else:
                tally.add(index, text, max_tokens, began, answer, None)

    running = [asyncio.ensure_future(loop(*job)) for job in _assignments(workload)]
    _, pending = await asyncio.wait(running, timeout=max(0.0, deadline + grace - time.time()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    return tally.result(len(pending))
