"""Subprocess worker of overhead.py: ``@stable`` around a no-op, timed in a process of its own.

Standard library only, so that it runs under the project's python (``kind`` "ours") and under
benchmarks/.venvs/original's (``kind`` "original", stable-openai 0.1.1, same import name).
Run as ``<python> _overhead_worker.py '<spec json>'`` with the spec:

- ``kind``: "ours" or "original" (checked against where ``stable_openai`` was imported from);
- ``keys``: how many made-up keys to give ``KeyManager``;
- ``threads``: the thread counts to time, in order;
- ``calls``: bare-call count, and the most calls a timed sample of ``@stable`` may make;
- ``fixed``: ``{threads: calls}`` to time exactly that many calls (later rounds), else
- ``budget``: seconds one timed sample may take; a pilot run sizes it (first round).

Prints one line to stdout, ``RESULT {json}``: package versions and, per thread count, either
``{"calls", "us", "bare_calls", "bare_us"}`` or ``{"error"}``; then ``os._exit``, because
0.1.1's ``KeyManager`` starts a non-daemon thread that never ends.  Whatever the libraries
print goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import _harness

PILOT_SECONDS = 0.05  # the pilot grows until one run of it takes this long
PILOT_RUNS = 3  # then runs this many times; the fastest sizes the samples


def made_up_keys(count: int) -> list[str]:
    return [f"sk-bench-{i:08d}-{'x' * 24}" for i in range(count)]


def noop(api_key: str) -> int:
    return 1  # truthy: 0.1.1's backoff.on_predicate retries a falsy result, sleeping


def timed(func: Callable[[], Any], calls: int, threads: int) -> float:
    """Wall seconds for ``calls`` calls (a multiple of ``threads``) shared by ``threads``."""
    share = calls // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(share):
            func()

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def whole(calls: float, threads: int) -> int:
    """``calls`` rounded down to a multiple of ``threads``, at least ``threads``."""
    return max(threads, int(calls) // threads * threads)


def sample_size(wrapped: Callable[[], Any], threads: int, cap: int, budget: float) -> int:
    """Calls one sample may make to take about ``budget`` s, from pilot runs (also a warm-up):
    the pilot grows until it takes PILOT_SECONDS, then the best of PILOT_RUNS runs of it counts,
    so that a moment of load on the machine does not shrink every later sample."""
    calls = threads
    while True:
        seconds = timed(wrapped, calls, threads)
        if seconds >= PILOT_SECONDS or calls >= cap:
            break
        calls = whole(calls * 4, threads)
    seconds = min(seconds, *(timed(wrapped, calls, threads) for _ in range(PILOT_RUNS - 1)))
    return min(whole(cap, threads), whole(budget * calls / max(seconds, 1e-9), threads))


def load(kind: str) -> tuple[Any, Any]:
    """``KeyManager`` and ``stable`` of the package ``kind`` names, checked by location."""
    import stable_openai
    from stable_openai import KeyManager, stable

    where = os.path.realpath(stable_openai.__file__)
    inside = os.path.realpath(sys.prefix) + os.sep
    repo = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
    if kind == "original" and not where.startswith(inside):
        raise RuntimeError(f"stable_openai imported from outside the venv: {where}")
    if kind == "ours" and not where.startswith(repo):
        raise RuntimeError(f"stable_openai imported from outside this checkout: {where}")
    return KeyManager, stable


def in_flight(manager: Any) -> int:
    """Calls ours still counts as running (0.1.1 keeps no such count)."""
    stats = getattr(manager, "stats", None)
    return sum(row["in_flight"] for row in stats()) if stats is not None else 0


def run(spec: dict[str, Any]) -> dict[str, Any]:
    KeyManager, stable = load(spec["kind"])
    manager = KeyManager(made_up_keys(spec["keys"]))
    wrapped = stable(noop)
    answer = wrapped()
    if answer != 1:
        raise RuntimeError(f"@stable(noop)() returned {answer!r}, not 1")

    def bare() -> int:
        return noop(api_key="sk-x")

    fixed = {int(k): int(v) for k, v in (spec.get("fixed") or {}).items()}
    result: dict[str, Any] = {"versions": _harness.versions("stable-openai", "openai", "backoff"),
                              "python": sys.version.split()[0], "threads": {}}
    for threads in spec["threads"]:
        try:
            if threads in fixed:
                calls = fixed[threads]
                timed(wrapped, whole(min(calls, 1000), threads), threads)  # warm-up
            else:
                calls = sample_size(wrapped, threads, spec["calls"], spec["budget"])
            bare_calls = whole(spec["calls"], threads)
            timed(bare, whole(min(bare_calls, 1000), threads), threads)  # warm-up
            bare_seconds = timed(bare, bare_calls, threads)
            seconds = timed(wrapped, calls, threads)
            leftover = in_flight(manager)
            if leftover:
                raise RuntimeError(f"{leftover} calls still marked in flight")
            result["threads"][str(threads)] = {
                "calls": calls, "us": seconds / calls * 1e6,
                "bare_calls": bare_calls, "bare_us": bare_seconds / bare_calls * 1e6,
            }
        except Exception as exc:  # one thread count failing does not sink the other
            traceback.print_exc()
            result["threads"][str(threads)] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
    return result


def main() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever the libraries print stays off the result line
    try:
        result = run(json.loads(sys.argv[1]))
        code = 0
    except BaseException as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        code = 1
    out.write("RESULT " + json.dumps(result, separators=(",", ":")) + "\n")
    out.flush()
    sys.stderr.flush()
    os._exit(code)  # 0.1.1's KeyManager thread is not a daemon and never ends


if __name__ == "__main__":
    main()
