"""Per-call cost of @stable around a function that does nothing.

Prints µs per call for 1 and 32 threads, with 8 and with 10,000 keys, beside the bare
function call measured in the same run.  Figures are wall-clock on a shared machine: compare
the ratios printed side by side, not absolute numbers across runs.

    python benchmarks/overhead.py [--calls N] [--repeat R]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from stable_openai import KeyManager, stable


def made_up_keys(count: int) -> list[str]:
    return [f"sk-bench-{i:08d}-{'x' * 24}" for i in range(count)]


def noop(api_key: str) -> int:
    return 1


def per_call_us(func: Callable[[], Any], calls: int, threads: int) -> float:
    """Wall time per call (µs) of ``calls`` calls shared across ``threads`` threads."""
    share = calls // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(share):
            func()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - start) / (share * threads) * 1e6


def best(func: Callable[[], Any], calls: int, threads: int, repeat: int) -> float:
    return min(per_call_us(func, calls, threads) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    bare = best(lambda: noop(api_key="sk-x"), args.calls, 1, args.repeat)
    print(f"python {platform.python_version()} on {platform.machine()}, {args.calls} calls, "
          f"best of {args.repeat}")
    print(f"bare function call: {bare:.3f} µs")
    print(f"{'keys':>6} {'threads':>7} {'µs/call':>8} {'overhead µs':>11}")
    results: dict[tuple[int, int], float] = {}
    for keys in (8, 10_000):
        KeyManager.reset()
        KeyManager(made_up_keys(keys))
        wrapped = stable(noop)
        for threads in (1, 32):
            samples = [per_call_us(wrapped, args.calls, threads) for _ in range(args.repeat)]
            results[keys, threads] = min(samples) - bare
            print(f"{keys:>6} {threads:>7} {min(samples):>8.3f} {results[keys, threads]:>11.3f}"
                  f"   (median {statistics.median(samples):.3f})")
        leftover = sum(row["in_flight"] for row in KeyManager().stats())
        assert leftover == 0, f"{leftover} calls still marked in flight"
    for threads in (1, 32):
        growth = results[10_000, threads] / results[8, threads]
        print(f"growth 8 → 10,000 keys at {threads} thread(s): {growth:.2f}×")


if __name__ == "__main__":
    main()
