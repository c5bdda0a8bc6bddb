"""What thousands of keys cost with pooled clients: one call on every key, sync and async.

Each configuration runs in a subprocess of its own (a fresh process: no client built yet):
``KeyManager`` with N made-up keys, all pointed at the local simulator, then one call on every
key through a decorated function that takes ``client`` — threads for the sync client, one
``asyncio`` loop with N coroutines for the async one.  Printed per configuration: the seconds
until every key had answered once, the milliseconds of that per key, the process's resident
memory grown per key, the file descriptors open at the end (one keep-alive connection per key
that was used is expected: each key has its own connection pool), and the longest time the
event loop was held without yielding (async only: a client built on the loop holds it).

``--tls per-client`` runs the same with each client building its own TLS settings, as the
library did before it shared one set (issue 12, item 22): the two rows side by side are the
measurement of that change.

    python benchmarks/many_keys.py [--keys 200,2000] [--tls shared,per-client]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import asyncio, json, os, sys, threading, time
from concurrent.futures import ThreadPoolExecutor

import openai
from stable_openai import Key, KeyManager, stable
from stable_openai import _clients
from stable_openai.simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig

count, mode, tls = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if tls == "per-client":
    _clients._tls = False  # each client builds its own, as before the change


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


keys = [f"sk-many-{index:06d}-MADEUP{index * 7919 % 100000:05d}" for index in range(count)]
config = SimulatorConfig(
    keys=tuple(SimKey(key, project=f"p{index}") for index, key in enumerate(keys)),
    projects={f"p{index}": ProjectLimits(rpm=10_000) for index in range(count)},
    window=60.0,
)
with Simulator(config) as sim:
    KeyManager([Key(key, base_url=sim.base_url) for key in keys])
    before = rss_kib()
    began = time.perf_counter()
    held = 0.0
    if mode == "sync":
        @stable
        def ask(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: ask(), range(count)))
    else:
        @stable
        async def ask_async(client: openai.AsyncOpenAI) -> str:
            return (await client.models.list()).data[0].id

        async def main() -> tuple[list[str], float]:
            longest = [0.0]

            async def watch() -> None:  # how long the loop goes without running this
                last = time.perf_counter()
                while True:
                    await asyncio.sleep(0.005)
                    now = time.perf_counter()
                    longest[0] = max(longest[0], now - last - 0.005)
                    last = now

            watcher = asyncio.ensure_future(watch())
            sem = asyncio.Semaphore(64)

            async def one() -> str:
                async with sem:
                    return await ask_async()

            answers = await asyncio.gather(*(one() for _ in range(count)))
            watcher.cancel()
            await KeyManager().aclose()
            return answers, longest[0]

        answers, held = asyncio.run(main())
    seconds = time.perf_counter() - began
    used = sum(1 for row in KeyManager().stats() if row["successes"])
    fds = len(os.listdir("/proc/self/fd"))
    print(json.dumps({
        "answers": len(answers), "keys_used": used, "seconds": seconds,
        "kib_per_key": (rss_kib() - before) / count, "fds": fds, "held": held,
    }))
    KeyManager().close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="200,2000")
    parser.add_argument("--tls", default="shared,per-client")
    parser.add_argument("--mode", default="sync,async")
    args = parser.parse_args()
    print("| keys | client | TLS settings | all answered (s) | ms per key | KiB per key "
          "| fds at end | longest loop stall (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for count in (int(n) for n in args.keys.split(",")):
        for mode in args.mode.split(","):
            for tls in args.tls.split(","):
                done = subprocess.run(
                    [sys.executable, "-c", WORKER, str(count), mode, tls],
                    capture_output=True, text=True, timeout=900, cwd=HERE,
                )
                if done.returncode:
                    tail = done.stderr.strip().splitlines()[-1:] or ["?"]
                    print(f"| {count} | {mode} | {tls} | failed: {tail[0][:80]} |")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                assert row["answers"] == count, row
                stall = f"{row['held'] * 1000:.0f}" if mode == "async" else "–"
                print(
                    f"| {count} | {mode} | {tls} | {row['seconds']:.2f} "
                    f"| {row['seconds'] / count * 1000:.2f} | {row['kib_per_key']:.0f} "
                    f"| {row['fds']} | {stall} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
