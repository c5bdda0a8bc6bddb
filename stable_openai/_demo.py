"""``stable-openai demo``: the library at work on the local simulator, no real key needed.

Starts the simulator with a realistic set of keys (several projects with tight limits, two
keys sharing one project's budget, one revoked key, one out of quota) and its default, strict
behaviour (OpenAI's refilling buckets, rejected requests counted), runs a concurrent
workload through ``@stable`` with the real ``openai`` client, shows live progress, and ends
with a summary.  Exit status 0 means every call got its own right answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

import openai

from ._decorator import stable
from ._keys import Key
from ._manager import KeyManager
from .simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig, echo_answer

MODEL = "gpt-4o-mini"


def demo_config(rpm: int, window: float, latency: float) -> SimulatorConfig:
    """Four good keys in three projects, plus one revoked key and one with no quota."""
    keys = (
        SimKey("sk-demo-alpha-1-0000000000000000A1", project="alpha", organization="org-alpha"),
        SimKey("sk-demo-alpha-2-0000000000000000A2", project="alpha", organization="org-alpha"),
        SimKey("sk-demo-beta-00-0000000000000000B1", project="beta", organization="org-beta"),
        SimKey("sk-demo-gamma-0-0000000000000000C1", project="gamma", organization="org-gamma"),
        SimKey("sk-demo-revoked-000000000000000R1", project="delta", status="revoked"),
        SimKey("sk-demo-noquota-000000000000000Q1", project="eps", status="no_quota"),
    )
    limits = ProjectLimits(rpm=rpm)
    return SimulatorConfig(
        keys=keys,
        projects={name: limits for name in ("alpha", "beta", "gamma", "delta", "eps")},
        window=window,
        latency=latency,
    )


class _Progress:
    """Counts calls and prints a live status line."""

    def __init__(self, total: int, out: TextIO, interval: float = 0.5) -> None:
        self.total = total
        self.out = out
        self.interval = interval
        self.done = 0
        self.right = 0
        self.errors: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.stop = threading.Event()
        self.live = out.isatty()

    def record(self, right: bool, error: BaseException | None = None) -> None:
        with self.lock:
            self.done += 1
            self.right += right
            if error is not None:
                self.errors[type(error).__name__] += 1

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        states = [row["state"] for row in KeyManager().stats()]
        counts = " · ".join(
            f"{states.count(state)} {state}" for state in ("ready", "cooling", "disabled")
        )
        return (
            f"  {self.done:>5}/{self.total} calls  {self.done / elapsed:6.1f}/s  keys: {counts}"
        )

    def run(self) -> None:
        while not self.stop.wait(self.interval if self.live else 2.0):
            if self.live:
                self.out.write("\r" + self.line())
            else:
                self.out.write(self.line() + "\n")
            self.out.flush()
        if self.live:
            self.out.write("\r" + self.line() + "\n")
            self.out.flush()


def _run_threads(
    ask: Callable[[str], str], prompts: list[str], threads: int, progress: _Progress
) -> list[str | BaseException]:
    def one(prompt: str) -> str | BaseException:
        try:
            answer = ask(prompt)
        except Exception as exc:
            progress.record(False, exc)
            return exc
        progress.record(answer == echo_answer(prompt))
        return answer

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, prompts))


def _run_async(prompts: list[str], concurrency: int, progress: _Progress) -> None:
    @stable
    async def ask(prompt: str, client: openai.AsyncOpenAI) -> str:
        response = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}]
        )
        return response.choices[0].message.content or ""

    async def main() -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> None:
            async with gate:
                try:
                    answer = await ask(prompt)
                except Exception as exc:
                    progress.record(False, exc)
                    return
                progress.record(answer == echo_answer(prompt))

        try:
            await asyncio.gather(*(one(prompt) for prompt in prompts))
        finally:
            await KeyManager().aclose()

    asyncio.run(main())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300, help="calls to make (default 300)")
    parser.add_argument("--threads", type=int, default=16, help="worker threads (default 16)")
    parser.add_argument(
        "--async", dest="use_async", action="store_true",
        help="use asyncio and AsyncOpenAI instead of threads",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="coroutines in flight with --async"
    )
    parser.add_argument(
        "--rpm", type=int, default=10, help="requests per window for each project (default 10)"
    )
    parser.add_argument(
        "--window", type=float, default=1.0, help="rate-limit window in seconds (default 1)"
    )
    parser.add_argument(
        "--latency", type=float, default=0.02, help="server latency in seconds (default 0.02)"
    )


def _positive(args: argparse.Namespace) -> str | None:
    for name in ("calls", "threads", "concurrency", "rpm"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1"
        if getattr(args, name) > 1_000_000:
            return f"--{name} must be at most 1000000"
    if not 0 < args.window <= 3600:
        return "--window must be between 0 and 3600 seconds"
    if not 0 <= args.latency <= 60:
        return "--latency must be between 0 and 60 seconds"
    return None


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    problem = _positive(args)
    if problem:
        print(f"stable-openai demo: {problem}", file=sys.stderr)
        return 2
    config = demo_config(args.rpm, args.window, args.latency)
    good = [key for key in config.keys if key.status == "ok"]
    projects = {key.project for key in good}
    limit_per_s = len(projects) * args.rpm / args.window
    with Simulator(config) as sim:
        KeyManager([Key(key.key, base_url=sim.base_url) for key in config.keys])
        mode = f"asyncio, {args.concurrency} coroutines" if args.use_async else (
            f"{args.threads} threads"
        )
        print(
            f"stable-openai demo: {len(config.keys)} keys ({len(good)} good in {len(projects)} "
            f"projects, 1 revoked, 1 without quota), {args.rpm} requests per {args.window:g}s "
            f"per project; {args.calls} calls, {mode}; simulator at {sim.base_url}",
            file=out,
        )
        print(
            f"the simulator behaves as OpenAI documents ({config.limiter} limiter: buckets "
            "that refill continuously; rejected requests count against the limit; profile "
            f"{config.profile}: x-ratelimit-* headers and OpenAI's 429 bodies)",
            file=out,
        )
        prompts = [f"Request {index + 1}: Hello, world!" for index in range(args.calls)]
        progress = _Progress(args.calls, out)
        ticker = threading.Thread(target=progress.run, daemon=True)
        ticker.start()
        if args.use_async:
            _run_async(prompts, args.concurrency, progress)
        else:

            @stable
            def ask(prompt: str, client: openai.OpenAI) -> str:
                response = client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}]
                )
                return response.choices[0].message.content or ""

            _run_threads(ask, prompts, args.threads, progress)
            KeyManager().close()
        elapsed = time.monotonic() - progress.start
        progress.stop.set()
        ticker.join()
        totals: dict[str, Any] = sim.stats()["totals"]
    _summary(out, progress, elapsed, totals, limit_per_s)
    return 0 if progress.right == args.calls else 1


def _summary(
    out: TextIO, progress: _Progress, elapsed: float, totals: dict[str, Any], limit: float
) -> None:
    rate = progress.right / elapsed if elapsed > 0 else 0.0
    print("", file=out)
    print(f"answers right    {progress.right}/{progress.total}", file=out)
    if progress.errors:
        failed = ", ".join(f"{n} {name}" for name, n in progress.errors.most_common())
        print(f"calls failed     {failed}", file=out)
    print(
        f"429s seen        {totals['rate_limited']} rate limit, {totals['quota']} no quota; "
        f"401s {totals['unauthorized']}",
        file=out,
    )
    for row in KeyManager().stats():
        why = f" — {row['reason']}" if row["reason"] else ""
        left = f", {row['seconds_left']:.0f}s left" if row["state"] == "cooling" else ""
        print(
            f"key {row['key']:<10} {row['state']:<8} {row['successes']:>4} ok "
            f"{row['rate_limits']:>3} rate-limited {row['failures']:>3} failed{left}{why}",
            file=out,
        )
    print(
        f"throughput       {rate:.1f} answers/s in {elapsed:.1f}s = {rate / limit:.2f} of the "
        f"keys' combined limit ({limit:g}/s)",
        file=out,
    )
