"""Chaos run: many threads and coroutines through ``@stable`` against a faulty simulator.

Threads (real ``openai.OpenAI``) and coroutines (``openai.AsyncOpenAI``, in their own thread
and event loop) call one simulator for ``--seconds``: several keys in several projects with
RPM limits in 1-s windows, injected faults (spurious 429s, 500s, 503s, slow answers, dropped
connections) and one key revoked a third of the way through.  Then it prints the figures and
checks that they reconcile:

- every call returned its own right answer or raised an ``openai.OpenAIError``;
- every thread and the event loop ended (bounded joins);
- the simulator's count of ``ok`` answers equals the successes the callers saw;
- nothing is left in flight: per key, per pool, in the wait queue, at the server.

Exit status 1 if any check fails.

    python benchmarks/chaos.py [--threads 100] [--coroutines 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections import Counter
from typing import Any

import openai

from stable_openai import KeyManager, stable
from stable_openai.simulator import (
    Faults,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    echo_answer,
)

MODEL = "gpt-4o-mini"
FAULTS = Faults(
    rate_limit=0.05, error_500=0.05, error_503=0.05, slow=0.02, slow_seconds=0.2, drop=0.03
)


def made_up_keys(count: int) -> list[str]:
    return [f"sk-chaos-{index:04d}-MADEUP{index * 7919:012d}" for index in range(count)]


def config(keys: list[str], rpm: int, seed: int) -> SimulatorConfig:
    """Two keys share project a; b, c, d and e have one key each (e's is revoked later)."""
    projects = ["a", "a", "b", "c", "d", "e"]
    return SimulatorConfig(
        keys=tuple(
            SimKey(key, project=project, organization=f"org-{project}")
            for key, project in zip(keys, projects)
        ),
        projects={name: ProjectLimits(rpm=rpm) for name in set(projects)},
        window=1.0,
        latency=0.005,
        faults=FAULTS,
        seed=seed,
    )


class Tally:
    """Outcomes of every call, and how many calls are inside the function at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.successes = 0
        self.wrong: list[str] = []
        self.failures: Counter[str] = Counter()
        self.undocumented: list[str] = []
        self.inside = 0
        self.max_inside = 0

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1

    def record(self, prompt: str, answer: object, error: BaseException | None) -> None:
        with self.lock:
            self.calls += 1
            if error is not None:
                self.failures[type(error).__name__] += 1
                if not isinstance(error, openai.OpenAIError):
                    self.undocumented.append(repr(error))
            elif answer == echo_answer(prompt):
                self.successes += 1
            else:
                self.wrong.append(f"{prompt!r} -> {answer!r}")


def run(args: argparse.Namespace) -> int:
    keys = made_up_keys(6)
    tally = Tally()
    with Simulator(config(keys, args.rpm, args.seed)) as sim:
        manager = KeyManager(keys)
        clients: dict[str, openai.OpenAI] = {}
        clients_lock = threading.Lock()

        def client_for(api_key: str) -> openai.OpenAI:
            with clients_lock:
                client = clients.get(api_key)
                if client is None:
                    client = clients[api_key] = openai.OpenAI(
                        api_key=api_key, base_url=sim.base_url, max_retries=0
                    )
                return client

        @stable(backoff=0.01, max_backoff=0.1, max_wait=30)
        def ask(prompt: str, api_key: str) -> str | None:
            tally.enter()
            try:
                response = client_for(api_key).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompt}]
                )
            finally:
                tally.leave()
            return response.choices[0].message.content

        start = time.monotonic()
        deadline = start + args.seconds

        def worker(number: int) -> None:
            index = 0
            while time.monotonic() < deadline:
                prompt = f"thread {number} call {index}"
                index += 1
                try:
                    tally.record(prompt, ask(prompt), None)
                except Exception as exc:
                    tally.record(prompt, None, exc)

        def event_loop() -> None:
            async_clients: dict[str, openai.AsyncOpenAI] = {}

            @stable(backoff=0.01, max_backoff=0.1, max_wait=30)
            async def ask_async(prompt: str, api_key: str) -> str | None:
                client = async_clients.get(api_key)
                if client is None:
                    client = async_clients[api_key] = openai.AsyncOpenAI(
                        api_key=api_key, base_url=sim.base_url, max_retries=0
                    )
                tally.enter()
                try:
                    response = await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": prompt}]
                    )
                finally:
                    tally.leave()
                return response.choices[0].message.content

            async def one(number: int) -> None:
                index = 0
                while time.monotonic() < deadline:
                    prompt = f"coroutine {number} call {index}"
                    index += 1
                    try:
                        tally.record(prompt, await ask_async(prompt), None)
                    except Exception as exc:
                        tally.record(prompt, None, exc)

            async def main() -> None:
                try:
                    await asyncio.gather(*(one(n) for n in range(args.coroutines)))
                finally:
                    for client in async_clients.values():
                        await client.close()

            asyncio.run(main())

        threads = [
            threading.Thread(target=worker, args=(n,), daemon=True) for n in range(args.threads)
        ]
        if args.coroutines:
            threads.append(threading.Thread(target=event_loop, daemon=True, name="asyncio"))
        for thread in threads:
            thread.start()
        revoked_at = start + args.seconds / 3
        while time.monotonic() < revoked_at and any(t.is_alive() for t in threads):
            time.sleep(0.05)
        sim.set_key_status(keys[-1], "revoked")
        grace = time.monotonic() + args.seconds + 60  # a call may wait max_wait=30 s
        for thread in threads:
            thread.join(timeout=max(0.0, grace - time.monotonic()))
        elapsed = time.monotonic() - start
        alive = sum(thread.is_alive() for thread in threads)
        if not alive:
            for client in clients.values():
                client.close()
        server: dict[str, Any] = sim.stats()["totals"]
        rows = manager.stats()
        pools = {pool.name: pool.in_flight for pool in manager._ring.pools()}
        queued = len(manager._queue)
        revoked_row = next(row for row in rows if row["key"].endswith(keys[-1][-4:]))

    failures = ", ".join(f"{n} {name}" for name, n in tally.failures.most_common()) or "none"
    figures = [
        ("callers", f"{args.threads} threads + {args.coroutines} coroutines"),
        ("calls", str(tally.calls)),
        ("successes", f"{tally.successes} ({tally.successes / max(elapsed, 1e-9):.1f}/s)"),
        ("failures", failures),
        ("wrong answers", str(len(tally.wrong))),
        ("429s at server", f"{server['rate_limited']} rate limit, {server['quota']} no quota "
                           "(injected 429s count as faults)"),
        ("faults at server", f"{server['faults']} (429/500/503/drop)"),
        ("401s at server", f"{server['unauthorized']} (revoked key now {revoked_row['state']})"),
        ("server requests", f"{server['requests']}, {server['ok']} ok"),
        ("library saw", f"{sum(r['rate_limits'] for r in rows)} rate limits, "
                        f"{sum(r['failures'] for r in rows)} other failures"),
        ("max in flight", f"{tally.max_inside} in the function, {server['max_in_flight']} at "
                          "the server"),
        ("elapsed", f"{elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in figures)
    print(f"chaos run: {args.seconds:g} s, seed {args.seed}")
    for name, value in figures:
        print(f"  {name:<{width}}  {value}")

    checks = [
        ("every caller ended", alive == 0, f"{alive} still running"),
        ("every answer right or a documented error",
         not tally.wrong and not tally.undocumented,
         "; ".join((tally.wrong + tally.undocumented)[:5])),
        ("simulator ok == client successes", server["ok"] == tally.successes,
         f"{server['ok']} != {tally.successes}"),
        ("library successes == client successes",
         sum(r["successes"] for r in rows) == tally.successes,
         f"{sum(r['successes'] for r in rows)} != {tally.successes}"),
        ("keys in flight back to 0", sum(r["in_flight"] for r in rows) == 0,
         str([r["in_flight"] for r in rows])),
        ("pools in flight back to 0", all(n == 0 for n in pools.values()), str(pools)),
        ("wait queue empty", queued == 0, f"{queued} queued"),
        ("server in flight back to 0", server["in_flight"] == 0, str(server["in_flight"])),
        ("the revoked key is disabled", revoked_row["state"] == "disabled",
         revoked_row["state"]),
    ]
    print("checks:")
    failed = 0
    for name, ok, detail in checks:
        print(f"  {'ok  ' if ok else 'FAIL'}  {name}{'' if ok else f': {detail}'}")
        failed += not ok
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=100, help="worker threads (100)")
    parser.add_argument("--coroutines", type=int, default=200, help="coroutines (200)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the run (30)")
    parser.add_argument("--rpm", type=int, default=40, help="requests per 1-s window (40)")
    parser.add_argument("--seed", type=int, default=20261125, help="fault RNG seed")
    args = parser.parse_args()
    if args.threads < 0 or args.coroutines < 0 or args.threads + args.coroutines == 0:
        parser.error("--threads and --coroutines must be >= 0, and not both 0")
    if not 0 < args.seconds <= 3600 or args.rpm < 1:
        parser.error("--seconds must be in (0, 3600] and --rpm at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
