"""Per-call cost of @stable around a function that does nothing, ours beside stable-openai 0.1.1.

Both packages decorate the same ``def noop(api_key): return 1`` after ``KeyManager(keys)`` with
8 and with 10,000 made-up keys, and are timed from 1 and from 32 threads, each in a subprocess
of its own (_overhead_worker.py): ours under this python, 0.1.1 under
benchmarks/.venvs/original (made on first use, as throughput.py makes it; it has our import
name).  The runs are interleaved, one process per contender, key count and round, the order of
the contenders alternating round by round, and each figure is the best of ``--repeat``.  The
bare function, called the same way (same threads, no decorator), is timed in every process.

The figure to read is the ratio of overheads, (ours − bare) ÷ (0.1.1 − bare), measured side by
side in one run: absolute µs on a shared 2-core machine move from run to run.  The target is
a ratio of at most 1/3.  Samples of @stable make at most ``--calls`` calls and are sized in
the first round to take about ``--budget`` s (0.1.1 scans every key on every call, so it makes
far fewer calls at 10,000 keys); the table says how many calls each figure is from.

    python benchmarks/overhead.py [--quick] [--calls N] [--repeat R] [--budget S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throughput import HERE, VENV_SPECS, child_env, ensure_venv

KEY_COUNTS = (8, 10_000)
THREAD_COUNTS = (1, 32)
CONTENDERS = ("ours", "original")
LABELS = {"ours": "ours", "original": "0.1.1"}
TARGET = 1 / 3
WORKER = HERE / "_overhead_worker.py"
TIMEOUT = 120.0  # one worker process: imports, set-up, pilots and one sample per thread count
DEFAULTS = {"calls": 200_000, "repeat": 5, "budget": 1.0}
QUICK = {"calls": 50_000, "repeat": 3, "budget": 0.3}


class Unavailable(Exception):
    """A worker that gave no result; the message says why."""


@dataclass
class Figure:
    """Samples of one contender at one (keys, threads)."""

    us: list[float] = field(default_factory=list)
    bare_us: list[float] = field(default_factory=list)
    calls: int | None = None  # of each sample, fixed by the first round
    error: str | None = None


def tail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or ["no output"])[-1][:160]


def run_worker(python: Path | str, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        done = subprocess.run([str(python), str(WORKER), json.dumps(spec)], capture_output=True,
                              text=True, timeout=TIMEOUT, env=child_env(), cwd=str(HERE))
    except subprocess.TimeoutExpired:
        raise Unavailable(f"no result within {TIMEOUT:.0f} s (killed)") from None
    except OSError as exc:
        raise Unavailable(f"cannot run {python}: {exc}") from None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = dict(json.loads(line[len("RESULT "):]))
            if "error" in result:
                raise Unavailable(result["error"])
            return result
    raise Unavailable(f"exit code {done.returncode}: {tail(done.stderr)}")


def measure(pythons: dict[str, Path | str], args: argparse.Namespace,
            versions: dict[str, dict[str, str]]) -> dict[tuple[str, int, int], Figure]:
    figures = {(c, k, t): Figure() for c in CONTENDERS for k in KEY_COUNTS for t in THREAD_COUNTS}
    for contender, python in pythons.items():
        if not isinstance(python, Path):
            for key in figures:
                if key[0] == contender:
                    figures[key].error = python
    began = time.monotonic()
    for round_ in range(args.repeat):
        order = CONTENDERS if round_ % 2 == 0 else CONTENDERS[::-1]
        for keys in KEY_COUNTS:
            for contender in order:
                pending = [t for t in THREAD_COUNTS if figures[contender, keys, t].error is None]
                if not pending:
                    continue
                fixed = {t: figures[contender, keys, t].calls for t in pending
                         if figures[contender, keys, t].calls is not None}
                spec = {"kind": contender, "keys": keys, "threads": pending, "calls": args.calls,
                        "budget": args.budget, "fixed": fixed}
                try:
                    result = run_worker(pythons[contender], spec)
                except Unavailable as exc:
                    for threads in pending:
                        figures[contender, keys, threads].error = str(exc)
                    continue
                versions[contender] = result["versions"]
                for threads in pending:
                    figure = figures[contender, keys, threads]
                    row = result["threads"][str(threads)]
                    if "error" in row:
                        figure.error = row["error"]
                        continue
                    figure.calls = row["calls"]
                    figure.us.append(row["us"])
                    figure.bare_us.append(row["bare_us"])
        print(f"round {round_ + 1}/{args.repeat} done at {time.monotonic() - began:.0f} s",
              flush=True)
    return figures


def number(value: float | None, width: int, places: int = 3) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{places}f}"


def report(figures: dict[tuple[str, int, int], Figure], args: argparse.Namespace) -> None:
    headers = ("keys", "threads", "ours µs", "0.1.1 µs", "bare µs", "ours ovh", "0.1.1 ovh",
               "ratio", "median ratio", "≤ 1/3", "calls per sample: ours / 0.1.1")
    widths = (6, 7, 8, 8, 7, 8, 9, 6, 12, 5, 0)
    print("  ".join(f"{h:>{w}}" for h, w in zip(headers, widths)))
    notes: list[str] = []
    overheads: dict[tuple[str, int, int], float] = {}
    for keys in KEY_COUNTS:
        for threads in THREAD_COUNTS:
            ours, original = (figures[c, keys, threads] for c in CONTENDERS)
            bares = [us for f in (ours, original) if f.error is None for us in f.bare_us]
            bare = min(bares) if bares else None
            best: dict[str, float | None] = {}
            median: dict[str, float | None] = {}
            for contender, figure in zip(CONTENDERS, (ours, original)):
                ok = figure.error is None and figure.us and bare is not None
                best[contender] = min(figure.us) if ok else None
                median[contender] = statistics.median(figure.us) if ok else None
                if figure.error is not None:
                    notes.append(f"{LABELS[contender]} at {keys} keys × {threads} threads: "
                                 f"n/a, {figure.error}")
                elif ok:
                    overheads[contender, keys, threads] = min(figure.us) - bare

            def ratio(of: dict[str, float | None], bare: float | None = bare) -> float | None:
                a, b = of["ours"], of["original"]
                if a is None or b is None or bare is None or b - bare <= 0:
                    return None
                return (a - bare) / (b - bare)

            best_ratio = ratio(best)
            verdict = "n/a" if best_ratio is None else ("yes" if best_ratio <= TARGET else "NO")
            calls = " / ".join("n/a" if f.calls is None else f"{f.calls:,}"
                               for f in (ours, original))
            ovh = [None if v is None or bare is None else v - bare
                   for v in (best["ours"], best["original"])]
            cells = (f"{keys:>6}", f"{threads:>7}", number(best["ours"], 8),
                     number(best["original"], 8), number(bare, 7), number(ovh[0], 8),
                     number(ovh[1], 9), number(best_ratio, 6), number(ratio(median), 12),
                     f"{verdict:>5}", calls)
            print("  ".join(cells))
    for contender in CONTENDERS:
        growth = []
        for threads in THREAD_COUNTS:
            low = overheads.get((contender, 8, threads))
            high = overheads.get((contender, 10_000, threads))
            if low is not None and high is not None and low > 0:
                growth.append(f"{high / low:.2f}× at {threads} thread(s)")
        if growth:
            print(f"growth of the overhead, 8 → 10,000 keys, {LABELS[contender]}: "
                  f"{', '.join(growth)}")
    bare_calls = sorted({args.calls // t * t for t in THREAD_COUNTS})
    print(f"µs per call: best of {args.repeat} samples (one per round, interleaved); "
          "ovh = µs − bare; ratio = ours ovh ÷ 0.1.1 ovh (target ≤ 1/3);\nmedian ratio: the "
          "same from the medians; bare: the best of both contenders' bare samples, "
          f"{' or '.join(f'{n:,}' for n in bare_calls)} calls each.")
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"defaults {QUICK} instead of {DEFAULTS}")
    parser.add_argument("--calls", type=int, help="bare calls per sample, and the most calls a "
                        "sample of @stable makes")
    parser.add_argument("--repeat", type=int, help="rounds (samples per figure)")
    parser.add_argument("--budget", type=float, help="seconds a sample of @stable should take")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    began = time.monotonic()

    pythons: dict[str, Path | str] = {"ours": Path(sys.executable)}
    versions: dict[str, dict[str, str]] = {}
    spec = next(v for v in VENV_SPECS if v.name == "original")
    venv = ensure_venv(dataclasses.replace(spec))
    pythons["original"] = venv.python if venv.python is not None else f"venv: {venv.problem}"
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores; "
          f"@stable around a no-op, at most {args.calls:,} calls and about {args.budget:g} s per "
          f"sample, best of {args.repeat}", flush=True)
    figures = measure(pythons, args, versions)

    for contender in CONTENDERS:
        found = versions.get(contender, {})
        packages = ", ".join(f"{k} {v}" for k, v in found.items()) or "did not run"
        where = pythons[contender]
        shown = os.path.relpath(where) if isinstance(where, Path) else where
        print(f"{LABELS[contender]}: {packages} ({shown})")
    report(figures, args)
    print(f"{time.monotonic() - began:.0f} s in all")


if __name__ == "__main__":
    main()
