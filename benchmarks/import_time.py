"""What importing stable_openai costs beyond importing openai itself.

Each measurement is a fresh interpreter (``python -c "import X"``), timed from outside, best
of ``--repeat`` (7); the difference between ``import stable_openai`` and ``import openai`` is
what the library adds (target: under 100 ms).  Then ``python -X importtime`` shows where
stable_openai's own modules spend their time, and which modules it loads that ``import
openai`` alone does not.

    python benchmarks/import_time.py [--repeat 7] [--top 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 100.0


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONIMPORTTIME", None)
    return env


def wall_ms(statement: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def best_of(statements: list[str], repeat: int, env: dict[str, str]) -> list[float]:
    """Best wall time of each statement, the runs interleaved so that a burst of load on the
    machine hits them alike."""
    best = [float("inf")] * len(statements)
    for _ in range(repeat):
        for index, statement in enumerate(statements):
            best[index] = min(best[index], wall_ms(statement, env))
    return best


MARGINAL = (
    "import time; start = time.perf_counter(); import openai; middle = time.perf_counter(); "
    "import stable_openai; end = time.perf_counter(); "
    "print((middle - start) * 1000, (end - middle) * 1000)"
)


def marginal_ms(repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """In one fresh interpreter: ``import openai``, then ``import stable_openai`` on top of
    it (best of ``repeat``): what the library itself adds, without interpreter start-up."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", MARGINAL], env=env, check=True, capture_output=True,
            text=True,
        )
        first, second = (float(word) for word in done.stdout.split())
        runs.append((first, second))
    return min(r[0] for r in runs), min(r[1] for r in runs)


def importtime(statement: str, env: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``-X importtime``: module -> (self µs, cumulative µs)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], env=env, check=True,
        capture_output=True, text=True,
    )
    table: dict[str, tuple[int, int]] = {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|")
        table[name.strip()] = (int(own), int(cumulative))
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per measurement (7)")
    parser.add_argument("--top", type=int, default=10, help="modules to list (10)")
    args = parser.parse_args()
    env = environment()

    for statement in ("import openai", "import stable_openai"):  # warm the file caches
        wall_ms(statement, env)
    bare, plain, ours = best_of(
        ["pass", "import openai", "import stable_openai"], args.repeat, env
    )
    openai_ms, on_top_ms = marginal_ms(args.repeat, env)
    added = ours - plain
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"fresh interpreters, best of {args.repeat}, interleaved (Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load:.2f}):")
    print(f"  python -c pass                   {bare:8.1f} ms")
    print(f"  python -c 'import openai'        {plain:8.1f} ms")
    print(f"  python -c 'import stable_openai' {ours:8.1f} ms")
    verdict = "within" if added < TARGET_MS else "OVER"
    print(f"  difference                       {added:8.1f} ms  ({verdict} the {TARGET_MS:.0f} "
          "ms target)")
    verdict = "within" if on_top_ms < TARGET_MS else "OVER"
    print(f"  import stable_openai after openai{on_top_ms:8.1f} ms  ({verdict} the target; "
          f"openai itself took {openai_ms:.1f} ms in the same runs)")

    with_openai = importtime("import openai", env)
    with_ours = importtime("import stable_openai", env)
    own = {name: times for name, times in with_ours.items() if name.startswith("stable_openai")}
    print(f"\n-X importtime, stable_openai's own modules (top {args.top} by self time):")
    print(f"  {'module':<34} {'self ms':>8} {'cumulative ms':>14}")
    for name, (self_us, cumulative_us) in sorted(own.items(), key=lambda i: -i[1][0])[:args.top]:
        print(f"  {name:<34} {self_us / 1000:8.2f} {cumulative_us / 1000:14.2f}")
    extra = {
        name: times for name, times in with_ours.items()
        if name not in with_openai and not name.startswith("stable_openai")
    }
    extra_ms = sum(self_us for self_us, _ in extra.values()) / 1000
    own_ms = sum(self_us for self_us, _ in own.values()) / 1000
    print(f"\n  self time of stable_openai's modules: {own_ms:.2f} ms; of {len(extra)} other "
          f"modules that import openai alone does not load: {extra_ms:.2f} ms")
    for name, (self_us, _) in sorted(extra.items(), key=lambda i: -i[1][0])[:args.top]:
        print(f"    {name:<32} {self_us / 1000:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
