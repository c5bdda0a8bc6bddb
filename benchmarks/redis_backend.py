"""Several worker processes behind the same keys: the memory backend beside the Redis backend.

4 worker processes × 8 threads share 4 keys, each key in a project of its own limited to 10
requests per 1-s window on the local simulator (20 ms latency): a real limit of 40 requests/s
for all the workers together.  Each worker calls through ``@stable`` with the library's pooled
clients (the function takes ``client``), so every answer's ``x-ratelimit-*`` headers reach the
key state.  The simulator behaves as OpenAI documents (its default: refilling buckets, rejected
requests counted).  Run once with each worker's state in its own process (memory, the default),
once shared through Redis, each from full buckets for ``--duration`` seconds:

- *ok/s ÷ limit*: successful calls that returned within the run, per second, over 40/s;
- *429s/100 ok*: the 429s the simulator sent, per 100 successes;
- *failed*: calls that raised or did not return the simulator's echo.

Then the cost of the Redis backend itself, in this process against the same Redis: µs per call
of ``@stable`` around a function that does nothing, memory and Redis backends, one thread; and
Redis script calls (EVALSHA) per call, from Redis's own command statistics.

A ``redis-server`` is started on a free loopback port for the run (``--redis-server`` names the
binary), unless ``--redis-url`` points at one already running (a namespace of its own is used).

    python benchmarks/redis_backend.py [--duration 8] [--workers 4] [--threads 8]
                                       [--redis-url redis://...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import _harness
import openai

from stable_openai import KeyManager, stable
from stable_openai import __version__ as ours_version
from stable_openai.backends import RedisBackend
from stable_openai.simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig

MODEL = "gpt-4o-mini"
WINDOW = 1.0
LATENCY = 0.02
RPM = 10  # per project and window
KEYS = 4
PROBE_PROJECT = "probe"
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- worker process


def worker(spec: dict[str, Any]) -> None:
    """One worker process: set up, say READY, wait for GO, run the timed loop, say RESULT."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    backend = None
    if spec["redis_url"]:
        backend = RedisBackend(spec["redis_url"], namespace=spec["namespace"])
    manager = KeyManager(spec["keys"], backend=backend)

    def ask(model: str, text: str, max_tokens: int | None, client: Any) -> Any:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}])
        return answer.choices[0].message.content

    wrapped = stable(max_wait=60)(ask)
    with openai.OpenAI(api_key=spec["probe_key"], max_retries=0) as warm:  # imports, not timed
        warm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    print("READY", flush=True)
    go = json.loads(sys.stdin.readline().split(" ", 1)[1])
    result = _harness.run_threads(wrapped, [(MODEL, spec["threads"])], go["start"],
                                  go["deadline"], spec["grace"])
    result["shared"] = manager._shared is not None and manager.backend.available()
    print("RESULT " + json.dumps(result), flush=True)
    manager.close()
    os._exit(0)  # threads still busy after the grace period must not keep the process alive


# --------------------------------------------------------------------------- the run


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(binary: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            with redis.Redis(port=port, socket_timeout=0.5) as client:
                client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start on port {port}") from exc
            time.sleep(0.02)


def run_mode(label: str, sim: Simulator, keys: list[str], probe: str, redis_url: str | None,
             args: argparse.Namespace) -> dict[str, Any]:
    """One timed run of ``args.workers`` processes; the figures of the table."""
    spec = {"keys": keys, "probe_key": probe, "redis_url": redis_url,
            "namespace": f"bench-{uuid.uuid4().hex[:8]}", "threads": args.threads,
            "grace": args.grace}
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_API_KEYS")}
    env["OPENAI_BASE_URL"] = sim.base_url
    workers = [
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                          json.dumps(spec)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                         cwd=str(HERE))
        for _ in range(args.workers)
    ]
    for process in workers:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if line != "READY":
            raise SystemExit(f"{label}: a worker did not start ({line!r})")
    start = time.time() + 0.3
    deadline = start + args.duration
    time.sleep(max(0.0, start - 0.05 - time.time()))
    sim.reset_limits()  # full buckets, as a fresh server would have
    sim.reset_stats()
    for process in workers:
        assert process.stdin is not None
        process.stdin.write("GO " + json.dumps({"start": start, "deadline": deadline}) + "\n")
        process.stdin.flush()
    results = []
    for process in workers:
        assert process.stdout is not None
        lines = [line for line in process.stdout if line.startswith("RESULT ")]
        process.wait(30)
        if not lines:
            raise SystemExit(f"{label}: a worker gave no result")
        results.append(json.loads(lines[-1].split(" ", 1)[1]))
    projects = sim.stats()["projects"]
    limited = sum(projects[f"p{i}"]["rate_limited"] for i in range(KEYS))
    records = [r for result in results for r in result["records"]]
    ok = [r for r in records if r[0] and r[2] <= args.duration]
    failed = sum(1 for r in records if not r[0])
    latencies = sorted(r[1] for r in records)
    limit = KEYS * RPM / WINDOW
    return {
        "backend": label,
        "ok_per_limit": len(ok) / args.duration / limit,
        "limited_per_100": 100.0 * limited / max(1, len(ok)),
        "failed": failed,
        "unfinished": sum(result["unfinished"] for result in results),
        "errors": [result["errors"] for result in results if result["errors"]],
        "p50_ms": statistics.median(latencies) if latencies else math.nan,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] if latencies else math.nan,
        "shared": all(result["shared"] for result in results),
    }


def per_call_us(calls: int) -> float:
    def noop(api_key: str) -> int:
        return 1

    wrapped = stable(noop)
    wrapped()
    best = math.inf
    for _ in range(3):
        begin = time.perf_counter()
        for _ in range(calls):
            wrapped()
        best = min(best, (time.perf_counter() - begin) / calls * 1e6)
    return best


def overhead(redis_url: str) -> dict[str, float]:
    """µs per no-op call, memory and Redis; EVALSHA per call, from Redis's statistics."""
    import redis

    keys = [f"sk-bench-overhead-{i:04d}-{'x' * 24}" for i in range(KEYS)]
    KeyManager.reset()
    KeyManager(keys)
    memory = per_call_us(20_000)
    KeyManager.reset()
    manager = KeyManager(keys, backend=RedisBackend(redis_url,
                                                    namespace=f"bench-{uuid.uuid4().hex[:8]}"))
    per_call_us(10)  # registers the keys, loads the scripts
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        calls = 2_000
        shared = per_call_us(calls)
        after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert manager._shared is not None and manager.backend.available(), "Redis failed"
    KeyManager.reset()
    return {"memory_us": memory, "redis_us": shared, "overhead_us": shared - memory,
            "evalsha_per_call": (after - before) / (3 * calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--redis-url", help="a running Redis (default: start redis-server)")
    parser.add_argument("--redis-server", default=os.environ.get("REDIS_SERVER")
                        or shutil.which("redis-server") or "/usr/bin/redis-server")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    redis_process = None
    redis_url = args.redis_url
    if redis_url is None:
        redis_process, redis_url = start_redis(args.redis_server)
    keys = [f"sk-bench-shared-{i}-{'x' * 24}" for i in range(KEYS)]
    probe = f"sk-bench-shared-probe-{'x' * 24}"
    sim_keys = [SimKey(key, project=f"p{i}", organization=f"org-p{i}")
                for i, key in enumerate(keys)]
    projects = {f"p{i}": ProjectLimits(rpm=RPM) for i in range(KEYS)}
    projects[PROBE_PROJECT] = ProjectLimits(rpm=10**9)
    config = SimulatorConfig(keys=(*sim_keys, SimKey(probe, project=PROBE_PROJECT)),
                             projects=projects, window=WINDOW, latency=LATENCY)
    began = time.monotonic()
    try:
        with Simulator(config) as sim:
            rows = [run_mode("memory (each process its own)", sim, keys, probe, None, args)]
            time.sleep(1.1)
            rows.append(run_mode("redis (shared)", sim, keys, probe, redis_url, args))
        cost = overhead(redis_url)
    finally:
        if redis_process is not None:
            redis_process.kill()
            redis_process.wait(10)

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores, "
          f"stable-openai {ours_version}; {time.monotonic() - began:.0f} s in all")
    print(f"{args.workers} processes × {args.threads} threads, {KEYS} keys in {KEYS} projects, "
          f"rpm={RPM} per {WINDOW:g}-s window ({KEYS * RPM / WINDOW:g} requests/s in all), "
          f"{LATENCY * 1000:g} ms latency, {args.duration:g} s from full buckets; "
          "pooled clients\n")
    print("| backend | ok/s ÷ limit | 429s/100 ok | failed | p50 ms | p99 ms | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        notes = []
        if row["unfinished"]:
            notes.append(f"{row['unfinished']} unfinished")
        if row["errors"]:
            notes.append(f"errors: {row['errors']}")
        if row["backend"].startswith("redis") and not row["shared"]:
            notes.append("Redis was not answering at the end")
        print(f"| {row['backend']} | {row['ok_per_limit']:.2f} | {row['limited_per_100']:.1f} | "
              f"{row['failed']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{'; '.join(notes)} |")
    print(f"\nper call, @stable around a no-op, 1 thread: memory {cost['memory_us']:.1f} µs, "
          f"redis {cost['redis_us']:.1f} µs: the Redis backend adds "
          f"{cost['overhead_us']:.0f} µs; {cost['evalsha_per_call']:.2f} Redis round trips "
          "(EVALSHA) per call")
    if args.json:
        print(json.dumps({"rows": rows, "overhead": cost}, indent=2))


if __name__ == "__main__":
    main()
