"""Several worker processes behind the same keys: the memory backend beside the Redis backend.

4 worker processes × 8 threads share 4 keys, each key in a project of its own limited to 10
requests per 1-s window on the local simulator (20 ms latency): a real limit of 40 requests/s
for all the workers together.  Each worker calls through ``@stable`` with the library's pooled
clients (the function takes ``client``), so every answer's ``x-ratelimit-*`` headers reach the
key state — and, ``--mode api_key``, as the README's quick start does: the function takes
``api_key`` (one ``openai.OpenAI`` per key), and only the 429s teach the pace.  The
simulator behaves as OpenAI documents (its default: refilling buckets, rejected requests
counted).  Run once with each worker's state in its own process (memory, the default),
once shared through Redis, each from full buckets for ``--duration`` seconds:

- *share*: successful calls that returned within the run ÷ (40/s × (run time + one window)),
  what the server could admit (its buckets start full);
- *ok/s ÷ limit*: successful calls that returned within the run, per second, over 40/s;
- *429s/100 ok*: the 429s the simulator sent, per 100 successes; *after 2 s*: the same, of
  what the simulator counted after the first 2 s of the run (the steady state);
- *failed*: calls that raised or did not return the simulator's echo.

Then the cost of the Redis backend itself, in this process against the same Redis, one thread,
``--cost-calls`` calls (2000) per round after a few warm-up calls, ``--cost-rounds`` rounds (3)
in turn with the floor; times are the best round's:

- *ours*: µs per call of ``@stable(manager=KeyManager.create(keys, backend=RedisBackend(...)))``
  around a function that does nothing; beside it the same with the memory backend;
- *Redis commands per call*: from Redis's own ``INFO commandstats``, the calls of every
  command (those the scripts run included; INFO itself left out) over the timed calls; and
  EVALSHA per call alone;
- *server µs per call*: the ``usec`` of EVALSHA (which includes what the scripts run) over the
  timed calls, Redis's own CPU time;
- *floor*: two bare EVALSHA round trips per call, on the backend's own redis-py client: a
  script ``return 1`` declaring one key of the same hash-tag form (``{namespace}:x``), called
  twice per iteration; µs per pair, and *ours ÷ floor*.

The command counts assume nothing else uses the Redis meanwhile (true of the one started here).

A ``redis-server`` is started on a free loopback port for the run (``--redis-server`` names the
binary), unless ``--redis-url`` points at one already running (a namespace of its own is used).
``--cost-only`` skips the workers and measures the cost alone (a few seconds).

    python benchmarks/redis_backend.py [--duration 8] [--workers 4] [--threads 8]
                                       [--mode pooled,api_key]
                                       [--redis-url redis://...] [--json] [--cost-only]
                                       [--cost-calls 2000] [--cost-rounds 3]
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
import threading
import time
import uuid
from collections.abc import Callable
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
STEADY_AFTER = 2.0  # "429s after the first 2 s", as in throughput.py
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

    clients = {key: openai.OpenAI(api_key=key, max_retries=0) for key in spec["keys"]}

    def ask_with_key(model: str, text: str, max_tokens: int | None, api_key: str) -> Any:
        answer = clients[api_key].chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}])
        return answer.choices[0].message.content

    wrapped = stable(max_wait=60)(ask if spec["mode"] == "pooled" else ask_with_key)
    with openai.OpenAI(api_key=spec["probe_key"], max_retries=0) as warm:  # imports, not timed
        warm.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    print("READY", flush=True)
    go = json.loads(sys.stdin.readline().split(" ", 1)[1])
    result = _harness.run_threads(wrapped, [(MODEL, spec["threads"])], go["start"],
                                  go["deadline"], spec["grace"])
    result["shared"] = manager.backend.shared and manager.backend.available()
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
             args: argparse.Namespace, mode: str = "pooled") -> dict[str, Any]:
    """One timed run of ``args.workers`` processes; the figures of the table."""
    spec = {"keys": keys, "probe_key": probe, "redis_url": redis_url,
            "namespace": f"bench-{uuid.uuid4().hex[:8]}", "threads": args.threads,
            "grace": args.grace, "mode": mode}
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
    early: dict[str, int] = {}  # the simulator's totals after the first STEADY_AFTER seconds
    snapshot = threading.Timer(max(0.0, start + STEADY_AFTER - time.time()),
                               lambda: early.update(sim.stats()["totals"]))
    snapshot.start()
    for process in workers:
        assert process.stdin is not None
        process.stdin.write("GO " + json.dumps({"start": start, "deadline": deadline}) + "\n")
        process.stdin.flush()
    results = []
    try:
        for process in workers:
            assert process.stdout is not None
            lines = [line for line in process.stdout if line.startswith("RESULT ")]
            process.wait(30)
            if not lines:
                raise SystemExit(f"{label}: a worker gave no result")
            results.append(json.loads(lines[-1].split(" ", 1)[1]))
    finally:
        snapshot.cancel()
    projects = sim.stats()["projects"]
    limited = sum(projects[f"p{i}"]["rate_limited"] for i in range(KEYS))
    totals = sim.stats()["totals"]
    steady_limited = totals.get("rate_limited", 0) - early.get("rate_limited", 0)
    steady_ok = totals.get("ok", 0) - early.get("ok", 0)
    records = [r for result in results for r in result["records"]]
    ok = [r for r in records if r[0] and r[2] <= args.duration]
    failed = sum(1 for r in records if not r[0])
    latencies = sorted(r[1] for r in records)
    limit = KEYS * RPM / WINDOW
    return {
        "backend": label,
        "mode": mode,
        "share": len(ok) / (limit * (args.duration + WINDOW)),
        "ok_per_limit": len(ok) / args.duration / limit,
        "limited_per_100": 100.0 * limited / max(1, len(ok)),
        "limited_steady_per_100": 100.0 * steady_limited / max(1, steady_ok) if early else math.nan,
        "failed": failed,
        "unfinished": sum(result["unfinished"] for result in results),
        "errors": [result["errors"] for result in results if result["errors"]],
        "p50_ms": statistics.median(latencies) if latencies else math.nan,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] if latencies else math.nan,
        "shared": all(result["shared"] for result in results),
    }


def noop(api_key: str) -> int:
    return 1


def _timed_us(call: Callable[[], object], calls: int) -> float:
    """µs per call of ``calls`` calls of ``call`` in a row."""
    begin = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - begin) / calls * 1e6


def per_call_us(manager: KeyManager, calls: int, rounds: int = 3) -> float:
    """µs per call of ``@stable(manager=manager)`` around a no-op: the best of ``rounds``."""
    wrapped = stable(manager=manager)(noop)
    for _ in range(10):
        wrapped()
    return min(_timed_us(wrapped, calls) for _ in range(rounds))


CommandStats = dict[str, dict[str, Any]]
#: What the measurement itself sends (the measuring client connects before the first snapshot).
NOT_COUNTED = ("cmdstat_info",)


def command_stats(client: Any) -> CommandStats:
    stats: CommandStats = client.info("commandstats")
    return {name: entry for name, entry in stats.items() if name not in NOT_COUNTED}


def stats_delta(before: CommandStats, after: CommandStats) -> dict[str, dict[str, int]]:
    """Per command, the growth of ``calls``, ``usec`` and errors between two snapshots."""
    delta = {}
    for name, entry in after.items():
        was = before.get(name, {})
        grown = {field: int(entry.get(field, 0)) - int(was.get(field, 0))
                 for field in ("calls", "usec", "failed_calls", "rejected_calls")}
        if any(grown.values()):
            delta[name.removeprefix("cmdstat_")] = grown
    return delta


def _add(total: dict[str, dict[str, int]], delta: dict[str, dict[str, int]]) -> None:
    for name, grown in delta.items():
        into = total.setdefault(name, dict.fromkeys(grown, 0))
        for field, value in grown.items():
            into[field] += value


def overhead(redis_url: str, calls: int = 2_000, rounds: int = 3) -> dict[str, Any]:
    """The cost of the Redis backend, one thread: see the module docstring."""
    import redis

    keys = [f"sk-bench-overhead-{i:04d}-{'x' * 24}" for i in range(KEYS)]
    memory_manager = KeyManager.create(keys)
    memory = per_call_us(memory_manager, 10 * calls)
    memory_manager.close()

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(redis_url, namespace=namespace)
    manager = KeyManager.create(keys, backend=backend)
    wrapped = stable(manager=manager)(noop)
    # The floor: the backend's own client (same pool and settings), a script as bare as can be.
    client = backend.client
    bare = client.register_script("return 1")
    bare_keys = ["{" + namespace + "}:x"]

    def pair() -> None:
        bare(keys=bare_keys, client=client)
        bare(keys=bare_keys, client=client)

    for _ in range(10):  # registers the keys, loads the scripts, opens the connection
        wrapped()
        pair()
    ours_us: list[float] = []
    floor_us: list[float] = []
    ours_stats: dict[str, dict[str, int]] = {}
    floor_stats: dict[str, dict[str, int]] = {}
    with redis.Redis.from_url(redis_url, decode_responses=True) as meter:
        redis_version = str(meter.info("server").get("redis_version", "?"))
        for _ in range(rounds):  # in turn, so that drift hits both alike
            before = command_stats(meter)
            ours_us.append(_timed_us(wrapped, calls))
            after = command_stats(meter)
            _add(ours_stats, stats_delta(before, after))
            floor_us.append(_timed_us(pair, calls))
            _add(floor_stats, stats_delta(after, command_stats(meter)))
    assert backend.shared and backend.available(), "Redis failed"
    manager.close()

    timed = rounds * calls

    def per_call(stats: dict[str, dict[str, int]], field: str, name: str | None = None) -> float:
        chosen = [grown for command, grown in stats.items() if name in (None, command)]
        return sum(grown[field] for grown in chosen) / timed

    ours, floor = min(ours_us), min(floor_us)
    errors = sum(g["failed_calls"] + g["rejected_calls"] for g in ours_stats.values())
    return {
        "redis_version": redis_version,
        "calls": calls,
        "rounds": rounds,
        "memory_us": memory,
        "redis_us": ours,
        "overhead_us": ours - memory,
        "redis_us_rounds": ours_us,
        "commands_per_call": per_call(ours_stats, "calls"),
        "evalsha_per_call": per_call(ours_stats, "calls", "evalsha"),
        "server_us_per_call": per_call(ours_stats, "usec", "evalsha"),
        "command_errors": errors,
        "commands": {name: grown["calls"] / timed for name, grown in sorted(ours_stats.items())},
        "floor_us": floor,
        "floor_us_rounds": floor_us,
        "floor_commands_per_pair": per_call(floor_stats, "calls"),
        "floor_evalsha_per_pair": per_call(floor_stats, "calls", "evalsha"),
        "floor_server_us_per_pair": per_call(floor_stats, "usec", "evalsha"),
        "ratio": ours / floor,
        "ratio_rounds": [a / b for a, b in zip(ours_us, floor_us)],
    }


def print_cost(cost: dict[str, Any]) -> None:
    print(f"cost, 1 thread, redis-server {cost['redis_version']}, best of {cost['rounds']} "
          f"rounds of {cost['calls']} calls (in turn with the floor):\n")
    print("| per call | µs | Redis commands | EVALSHA | server µs |")
    print("|---|---:|---:|---:|---:|")
    print(f"| @stable around a no-op, memory backend | {cost['memory_us']:.1f} | 0 | 0 | 0 |")
    print(f"| @stable around a no-op, Redis backend | {cost['redis_us']:.1f} | "
          f"{cost['commands_per_call']:.2f} | {cost['evalsha_per_call']:.2f} | "
          f"{cost['server_us_per_call']:.1f} |")
    print(f"| floor: two bare EVALSHA round trips | {cost['floor_us']:.1f} | "
          f"{cost['floor_commands_per_pair']:.2f} | {cost['floor_evalsha_per_pair']:.2f} | "
          f"{cost['floor_server_us_per_pair']:.1f} |")
    commands = ", ".join(f"{name} {n:.2f}" for name, n in cost["commands"].items())
    spread = cost["ratio_rounds"]
    print(f"\nours ÷ floor: {cost['ratio']:.2f} (µs, best rounds; round by round "
          f"{min(spread):.2f}–{max(spread):.2f}); the Redis backend adds "
          f"{cost['overhead_us']:.0f} µs to the memory backend's call; "
          f"Redis commands per call: {commands}"
          + (f"; {cost['command_errors']} commands FAILED" if cost["command_errors"] else ""))


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
    parser.add_argument("--cost-only", action="store_true",
                        help="measure the cost of the Redis backend only (no workers)")
    parser.add_argument("--cost-calls", type=int, default=2_000, help="timed calls per round")
    parser.add_argument("--cost-rounds", type=int, default=3)
    parser.add_argument("--mode", default="pooled,api_key",
                        help="comma-separated: pooled (the function takes client), api_key "
                             "(it takes api_key and keeps one openai.OpenAI per key)")
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.mode.split(",") if mode.strip()]
    if not modes or any(mode not in ("pooled", "api_key") for mode in modes):
        parser.error("--mode takes pooled and/or api_key")
    if args.cost_calls < 1 or args.cost_rounds < 1:
        parser.error("--cost-calls and --cost-rounds must be at least 1")
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
    rows: list[dict[str, Any]] = []
    try:
        if not args.cost_only:
            with Simulator(config) as sim:
                for mode in modes:
                    rows.append(run_mode("memory (each process its own)", sim, keys, probe,
                                         None, args, mode))
                    time.sleep(1.1)
                    rows.append(run_mode("redis (shared)", sim, keys, probe, redis_url, args,
                                         mode))
                    time.sleep(1.1)
        cost = overhead(redis_url, args.cost_calls, args.cost_rounds)
    finally:
        if redis_process is not None:
            redis_process.kill()
            redis_process.wait(10)

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores, "
          f"stable-openai {ours_version}; {time.monotonic() - began:.0f} s in all")
    if rows:
        print(f"{args.workers} processes × {args.threads} threads, {KEYS} keys in {KEYS} "
              f"projects, rpm={RPM} per {WINDOW:g}-s window ({KEYS * RPM / WINDOW:g} requests/s "
              f"in all), {LATENCY * 1000:g} ms latency, {args.duration:g} s from full buckets; "
              "share: successes ÷ (limit × (run time + one window))\n")
        print("| mode | backend | share | ok/s ÷ limit | 429s/100 ok | after 2 s | failed | p50 ms "
              "| p99 ms | notes |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        notes = []
        if row["unfinished"]:
            notes.append(f"{row['unfinished']} unfinished")
        if row["errors"]:
            notes.append(f"errors: {row['errors']}")
        if row["backend"].startswith("redis") and not row["shared"]:
            notes.append("Redis was not answering at the end")
        print(f"| {row['mode']} | {row['backend']} | {row['share']:.2f} | "
              f"{row['ok_per_limit']:.2f} | {row['limited_per_100']:.1f} | "
              f"{row['limited_steady_per_100']:.1f} | "
              f"{row['failed']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{'; '.join(notes)} |")
    print()
    print_cost(cost)
    if args.json:
        print(json.dumps({"rows": rows, "overhead": cost}, indent=2))

if __name__ == "__main__":
    main()
