"""Throughput under rate limits: stable_openai's modes beside the original package and LiteLLM.

Every contender runs against the local simulator (started here, in a thread) for a fixed time,
from N threads (or coroutines) that loop calls until the time is up, one scenario at a time:

  (a) 4 keys in 4 projects, rpm=10 per 1-s window, 16 threads;
  (b) 6 keys in 3 projects, two keys sharing each project's budget (rpm=10 per project);
  (c) 4 keys in 4 projects, tpm=2000 per 1-s window and no rpm limit, requests of mixed size;
  (d) 6 keys in 6 projects (rpm=10): 4 good, 1 revoked, 1 out of quota.

Columns: throughput ÷ the real limit (the sum of the per-project limits of the projects that
have a good key: in (b) 3 × 10/s, not 6 × 10/s; in (c) tokens of successful requests per
second ÷ the sum of tpm per second, a request costing ceil(chars / 4) + max_tokens tokens as
the simulator counts it), 429s the simulator sent per 100 successes, failed calls (raised, or
answered anything but the simulator's echo; the original package answers None on failure),
and p50/p99 call latency over every call that returned.

Each run starts just after a window boundary (found from the simulator's x-ratelimit-reset
header on a separate probe key) and counts the successes that returned within the duration, so
a perfect contender scores 1.00.  Between contenders the simulator's counters are reset,
KeyManager is reset, and the script sleeps 1.1 s and waits for a fresh window.  Every worker
makes one untimed call on the probe key first, so lazy imports are not timed.

Every contender runs in a subprocess of its own (benchmarks/_external.py), so none shares a
process, and a GIL, with the simulator: ours under this python, the original package
(stable-openai==0.1.1, same import name) and LiteLLM in virtual environments under
benchmarks/.venvs/, made on first use and reused.  ``--in-process`` runs ours in this process
instead, beside the simulator.  Figures are wall-clock on a shared 2-core machine.

    python benchmarks/throughput.py [--scenario a,b,c,d] [--duration 6] [--skip-external]
                                    [--in-process] [--grace 5] [--tasks 500] [--save]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import _harness
import _ours
import openai

from stable_openai import KeyManager
from stable_openai import __version__ as ours_version
from stable_openai.simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig, echo_answer

MODEL = "gpt-4o-mini"
WINDOW = 1.0
LATENCY = 0.02
HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
RESULTS = HERE / "RESULTS.md"
PROBE_PROJECT = "bench-probe"
SETUP_TIMEOUT = 180.0  # a subprocess's imports, set-up and warm-up call
PAUSE = 1.1  # between contenders, before waiting for the next window boundary


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    keys: tuple[SimKey, ...]
    projects: dict[str, ProjectLimits]
    threads: int = 16
    sized: bool = False

    @property
    def unit(self) -> str:
        return "tokens/s" if self.sized else "requests/s"

    @property
    def real_limit(self) -> float:
        """Per second: the limits of the projects that have a good key, summed once each."""
        good = {k.project for k in self.keys if k.status == "ok"}
        total = 0
        for project in good:
            limits = self.projects[project]
            limit = limits.tpm if self.sized else limits.rpm
            assert limit is not None, f"scenario {self.name}: project {project} has no limit"
            total += limit
        return total / WINDOW

    @property
    def probe_key(self) -> str:
        return f"sk-bench-{self.name}-probe-{'x' * 24}"

    def simulator_config(self) -> SimulatorConfig:
        probe = SimKey(self.probe_key, project=PROBE_PROJECT, organization="org-bench-probe")
        projects = {**self.projects, PROBE_PROJECT: ProjectLimits(rpm=10**9)}
        return SimulatorConfig(keys=(*self.keys, probe), projects=projects, window=WINDOW,
                               latency=LATENCY)

    @property
    def api_keys(self) -> list[str]:
        return [k.key for k in self.keys]


def _key(scenario: str, i: int, project: str, status: str = "ok") -> SimKey:
    return SimKey(f"sk-bench-{scenario}-{i}-{'x' * 24}", project=project,
                  organization=f"org-bench-{project}", status=status)


def scenarios() -> dict[str, Scenario]:
    rpm10 = ProjectLimits(rpm=10)
    bad = {1: "revoked", 3: "no_quota"}
    return {
        "a": Scenario(
            "a", "4 keys in 4 projects, rpm=10 per 1-s window",
            tuple(_key("a", i, f"a{i}") for i in range(4)),
            {f"a{i}": rpm10 for i in range(4)},
        ),
        "b": Scenario(
            "b", "6 keys in 3 projects, 2 keys share each project's rpm=10",
            tuple(_key("b", i, f"b{i // 2}") for i in range(6)),
            {f"b{i}": rpm10 for i in range(3)},
        ),
        "c": Scenario(
            "c", "4 keys in 4 projects, tpm=2000 per 1-s window, mixed request sizes",
            tuple(_key("c", i, f"c{i}") for i in range(4)),
            {f"c{i}": ProjectLimits(tpm=2000) for i in range(4)},
            sized=True,
        ),
        "d": Scenario(
            "d", "6 keys in 6 projects (rpm=10): 4 good, 1 revoked, 1 out of quota",
            tuple(_key("d", i, f"d{i}", bad.get(i, "ok")) for i in range(6)),
            {f"d{i}": rpm10 for i in range(6)},
        ),
    }


# --------------------------------------------------------------------------- windows


def parse_go_duration(text: str) -> float:
    """Seconds in a Go-style duration: ``0s``, ``12ms``, ``9.816s``, ``1m30.5s``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


class WindowClock:
    """Where the simulator's fixed windows start, in wall-clock time.

    A probe key in a project with a huge rpm gets ``x-ratelimit-reset-requests``: the time
    left in the current window, measured when the request was admitted (a little after it
    was sent, so the estimate is at most a few ms early).
    """

    def __init__(self, base_url: str, probe_key: str, probes: int = 3) -> None:
        estimates = [self._probe(base_url, probe_key) for _ in range(probes)]
        first = estimates[0]
        self.anchor = max(e - round((e - first) / WINDOW) * WINDOW for e in estimates)

    @staticmethod
    def _probe(base_url: str, key: str) -> float:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "probe"}]})
        request = urllib.request.Request(
            base_url + "/chat/completions", data=body.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        sent = time.time()
        with urllib.request.urlopen(request, timeout=10) as response:
            reset = response.headers["x-ratelimit-reset-requests"]
        return sent + parse_go_duration(reset)

    def next_start(self, after: float) -> float:
        """A moment 10 ms into the first window that starts after ``after``."""
        windows = math.ceil((after - self.anchor) / WINDOW)
        return self.anchor + windows * WINDOW + 0.01


def sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------- contenders


class Unavailable(Exception):
    """A contender that cannot run here; its message goes in the table."""


@dataclass
class Outcome:
    label: str
    records: list[list[float]] = field(default_factory=list)
    unfinished: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    limited: int = 0  # 429s the simulator sent: rate_limited + quota
    unavailable: str | None = None


@dataclass
class Context:
    """What a contender needs to run one timed pass."""

    scenario: Scenario
    sim: Simulator
    clock: WindowClock
    duration: float
    grace: float
    tasks: int

    def begin(self) -> tuple[float, float]:
        """Pause, pick the next window start, reset the counters just before it."""
        time.sleep(PAUSE)
        start = self.clock.next_start(time.time() + 0.1)
        sleep_until(start - 0.05)
        self.sim.reset_stats()
        return start, start + self.duration


# --------------------------------------------------------------------------- subprocesses


@dataclass
class Venv:
    name: str
    label: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]
    versions: tuple[str, ...]
    install_timeout: float
    python: Path | None = None
    installed: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


VENV_SPECS = (
    Venv("original", "stable-openai 0.1.1 (original)", ("stable-openai==0.1.1", "openai"),
         ("stable_openai", "openai"), ("stable-openai", "openai", "backoff"), 300.0),
    # 1.107.0 was a compromised release (withdrawn from PyPI); never pick it up.
    Venv("litellm", "LiteLLM Router (num_retries=3)", ("litellm!=1.107.*",),
         ("litellm",), ("litellm", "openai", "httpx", "aiohttp"), 900.0),
)

_CHECK = """
import importlib, json, sys
from importlib.metadata import version
for name in sys.argv[2:]:
    importlib.import_module(name)
print(json.dumps({name: version(name) for name in sys.argv[1].split(",")}))
"""


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "OPENAI_BASE_URL",
                        "OPENAI_API_KEY", "OPENAI_API_KEYS")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    return env


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return ((errors or lines or ["no output"])[-1])[:160]


def _check_venv(venv: Venv, python: Path) -> dict[str, str] | None:
    if not python.exists():
        return None
    try:
        done = subprocess.run(
            [str(python), "-c", _CHECK, ",".join(venv.versions), *venv.modules],
            capture_output=True, text=True, timeout=120, env=child_env(), cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ensure_venv(venv: Venv) -> Venv:
    """Reuse ``benchmarks/.venvs/<name>`` if it imports its packages, else make it."""
    path = VENVS / venv.name
    python = path / "bin" / "python"
    installed = _check_venv(venv, python)
    if installed is None:
        print(f"setting up {os.path.relpath(path)} "
              f"(pip install {' '.join(venv.requirements)}) ...", flush=True)
        env = child_env()
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)],
                           check=True, capture_output=True, text=True, timeout=300)
            done = subprocess.run(
                [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                 *venv.requirements],
                capture_output=True, text=True, timeout=venv.install_timeout, env=env,
            )
        except subprocess.TimeoutExpired as exc:
            venv.problem = f"install timed out after {exc.timeout:.0f} s"
            return venv
        except subprocess.CalledProcessError as exc:
            venv.problem = f"venv failed: {_last_error_line(exc.stderr or '')}"
            return venv
        if done.returncode != 0:
            venv.problem = f"pip install failed: {_last_error_line(done.stderr)}"
            return venv
        installed = _check_venv(venv, python)
        if installed is None:
            venv.problem = f"installed, but {', '.join(venv.modules)} does not import"
            return venv
    venv.python = python
    venv.installed = installed
    return venv


class Worker:
    """One subprocess speaking _external.py's line protocol."""

    def __init__(self, python: Path) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "_external.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=child_env(),
            cwd=str(HERE),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: TextIO | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        end = time.time() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.time()))
            except queue.Empty:
                raise Unavailable(f"no {tag} line within {timeout:.0f} s") from None
            if line is None:
                raise Unavailable(f"worker exited ({self.proc.wait()}): {self.stderr_tail()}")
            name, _, payload = line.rstrip("\n").partition(" ")
            if name == tag:
                return dict(json.loads(payload))
            if name == "ERROR":
                raise Unavailable(f"worker: {json.loads(payload)['message']}")

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return _last_error_line(self.stderr.read())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.stderr.close()


def run_worker(ctx: Context, python: Path, kind: str) -> dict[str, Any]:
    """Run one contender in a subprocess of ``python`` (see _external.py)."""
    worker = Worker(python)
    try:
        worker.send(json.dumps({
            "kind": kind, "base_url": ctx.sim.base_url, "keys": ctx.scenario.api_keys,
            "warmup_key": ctx.scenario.probe_key, "threads": ctx.scenario.threads,
            "tasks": ctx.tasks, "sized": ctx.scenario.sized, "grace": ctx.grace,
        }))
        worker.expect("READY", SETUP_TIMEOUT)
        start, deadline = ctx.begin()
        worker.send("GO " + json.dumps({"start": start, "deadline": deadline}))
        return worker.expect("RESULT", deadline + ctx.grace + 20.0 - time.time())
    finally:
        worker.close()


def run_in_process(ctx: Context, kind: str) -> dict[str, Any]:
    """Run one of our contenders in this process, beside the simulator."""
    KeyManager.reset()
    try:
        run = _ours.build(kind, ctx.sim.base_url, ctx.scenario.api_keys)
        start, deadline = ctx.begin()
        return run(start, deadline, ctx.grace, ctx.scenario.sized, ctx.scenario.threads,
                   ctx.tasks)
    finally:
        KeyManager.reset()


# --------------------------------------------------------------------------- one scenario


@dataclass(frozen=True)
class Contender:
    label: str
    kind: str  # one of _ours.KINDS, or a Venv's name
    venv: Venv | None = None

    @property
    def ours(self) -> bool:
        return self.venv is None

    def run(self, ctx: Context, in_process: bool) -> dict[str, Any]:
        if self.ours and self.kind == "pooled" and not _ours.pooled_client_mode():
            raise Unavailable("n/a (not available)")
        if self.venv is not None:
            if self.venv.python is None:
                raise Unavailable(f"n/a: {self.venv.problem}")
            return run_worker(ctx, self.venv.python, self.venv.name)
        if in_process:
            return run_in_process(ctx, self.kind)
        return run_worker(ctx, Path(sys.executable), f"ours:{self.kind}")


def contenders(tasks: int, venvs: list[Venv]) -> list[Contender]:
    return [
        Contender("ours api_key (max_retries=0)", "max0"),
        Contender("ours api_key (default retries)", "default"),
        Contender("ours pooled client", "pooled"),
        Contender(f"ours async ({tasks} coroutines)", "async"),
        *(Contender(venv.label, venv.name, venv) for venv in venvs),
    ]


def mask_keys(text: str, scenario: Scenario) -> str:
    for key in (*scenario.api_keys, scenario.probe_key):
        text = text.replace(key, key[:8] + "…")
    return text


def run_scenario(scenario: Scenario, entries: list[Contender], args: argparse.Namespace
                 ) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with Simulator(scenario.simulator_config()) as sim:
        clock = WindowClock(sim.base_url, scenario.probe_key)
        if args.in_process:  # load lazily imported modules before anything is timed
            _ours.warm_up(sim.base_url, scenario.probe_key)
        ctx = Context(scenario, sim, clock, args.duration, args.grace, args.tasks)
        for entry in entries:
            print(f"  ({scenario.name}) {entry.label} ...", end=" ", file=sys.stderr, flush=True)
            outcome = Outcome(entry.label)
            try:
                result = entry.run(ctx, args.in_process)
            except Unavailable as exc:
                outcome.unavailable = mask_keys(str(exc), scenario)
            except Exception as exc:
                outcome.unavailable = mask_keys(f"error: {type(exc).__name__}: {exc}",
                                                scenario)[:200]
            else:
                outcome.records = result["records"]
                outcome.unfinished = int(result["unfinished"])
                outcome.errors = {mask_keys(k, scenario): v for k, v in result["errors"].items()}
                totals = sim.stats()["totals"]
                outcome.limited = int(totals["rate_limited"]) + int(totals["quota"])
            print("done" if outcome.unavailable is None else "n/a", file=sys.stderr, flush=True)
            outcomes.append(outcome)
    return outcomes


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    label: str
    ratio: float | None
    per100: float | None
    failed: int | None
    p50: float | None
    p99: float | None
    note: str


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(outcome: Outcome, scenario: Scenario, duration: float) -> Row:
    if outcome.unavailable is not None:
        return Row(outcome.label, None, None, None, None, None, outcome.unavailable)
    records = outcome.records
    in_time = [r for r in records if r[0] and r[2] <= duration]
    amount = sum(r[3] for r in in_time) if scenario.sized else len(in_time)
    successes = sum(1 for r in records if r[0])
    latencies = [r[1] for r in records]
    notes = [f"{n} {name}" for name, n in sorted(outcome.errors.items(), key=lambda e: -e[1])]
    if outcome.unfinished:
        notes.append(f"{outcome.unfinished} unfinished after the grace period")
    return Row(
        outcome.label,
        amount / duration / scenario.real_limit,
        outcome.limited / successes * 100 if successes else None,
        len(records) - successes,
        percentile(latencies, 0.50) if latencies else None,
        percentile(latencies, 0.99) if latencies else None,
        "; ".join(notes[:3]),
    )


HEADERS = ("contender", "ok/s ÷ limit", "429s/100 ok", "failed", "p50 ms", "p99 ms", "notes")


def cells(row: Row) -> list[str]:
    def number(value: float | None, digits: int) -> str:
        if value is None:
            return "—"
        return f"{value:.{digits}f}"

    if row.ratio is None:
        return [row.label, row.note, "", "", "", "", ""]
    per100 = "∞ (no success)" if row.per100 is None else f"{row.per100:.1f}"
    return [row.label, f"{row.ratio:.2f}", per100, str(row.failed), number(row.p50, 0),
            number(row.p99, 0), row.note]


def versus_litellm(rows: list[Row], entries: list[Contender]) -> str:
    ours = [r for r, e in zip(rows, entries) if e.ours and r.ratio is not None]
    litellm = [r for r in rows if r.label.startswith("LiteLLM") and r.ratio is not None]
    if not ours or not litellm:
        return "ours ÷ LiteLLM: n/a"
    best = max(ours, key=lambda r: r.ratio or 0.0)
    theirs = litellm[0].ratio or 0.0
    factor = f"{(best.ratio or 0.0) / theirs:.2f}×" if theirs > 0 else "∞ (LiteLLM: 0)"
    return f"ours ÷ LiteLLM: {factor} (best of ours: {best.label}, {best.ratio:.2f} vs " \
           f"{theirs:.2f})"


def heading(scenario: Scenario) -> str:
    return (f"({scenario.name}) {scenario.title}, {scenario.threads} threads — real limit "
            f"{scenario.real_limit:g} {scenario.unit}")


def text_table(rows: list[Row]) -> str:
    """Aligned columns; a contender that did not run shows its reason after its label."""
    lines = [cells(row) for row in rows]
    measured = [list(HEADERS)] + [line for row, line in zip(rows, lines) if row.ratio is not None]
    widths = [max(len(line[i]) for line in measured) for i in range(len(HEADERS) - 1)]
    widths[0] = max(widths[0], *(len(row.label) for row in rows))

    def aligned(line: list[str]) -> str:
        parts = [line[0].ljust(widths[0])]
        parts += [cell.rjust(widths[i]) for i, cell in enumerate(line[1:-1], start=1)]
        return "  ".join([*parts, line[-1]]).rstrip()

    out = [aligned(list(HEADERS))]
    for row, line in zip(rows, lines):
        ran = row.ratio is not None
        out.append(aligned(line) if ran else f"{row.label:<{widths[0]}}  {row.note}")
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |",
             "|---|" + "---:|" * (len(HEADERS) - 2) + "---|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- RESULTS.md


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, cwd=HERE)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10, cwd=HERE)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = done.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def save(sections: list[tuple[Scenario, list[Row], str]], venvs: list[Venv], command: str,
         seconds: float, duration: float, in_process: bool) -> None:
    versions = [f"ours: stable-openai {ours_version}, openai {openai.__version__}"]
    for venv in venvs:
        if venv.python is not None:
            found = ", ".join(f"{k} {v}" for k, v in venv.installed.items())
            versions.append(f"{venv.name} venv: {found}")
        else:
            versions.append(f"{venv.name}: {venv.problem}")
    cores = os.cpu_count()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "## Throughput",
        "",
        f"`{command}` — {when}, commit {git_commit()}, {seconds:.0f} s in all.",
        "",
        f"- Machine: Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{cpu_model()}, {cores} cores, {platform.system()} {platform.release()}.",
        f"- Packages: {'; '.join(versions)}.",
        f"- Each contender runs {duration:g} s from a window boundary against the local "
        f"simulator (1-s windows, {LATENCY * 1000:g} ms latency). *ok/s ÷ limit*: successes "
        "that returned within the run, per second, over the real limit (the limits of the "
        "projects that have a good key, each counted once; in (c) tokens of successful "
        "requests, ceil(chars / 4) + max_tokens each). *429s/100 ok*: 429s the simulator "
        "sent (rate limit and no quota) per 100 successes. *failed*: calls that raised or "
        "did not return the simulator's echo (the original package returns None). Latency "
        "over every call that returned.",
        "- " + ("stable_openai's contenders ran in the script's process, beside the simulator; "
                "the others each in a subprocess." if in_process else
                "Every contender ran in a subprocess of its own; the simulator in the script's "
                "process."),
        "",
    ]
    for scenario, rows, versus in sections:
        body += [f"### {heading(scenario)}", "", markdown_table(rows), "", versus, ""]
    section = "\n".join(body).rstrip() + "\n"

    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.rstrip() == "## Throughput"), None)
    if begin is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        rest = "".join(lines[end:])
        new = "".join(lines[:begin]) + section + ("\n" + rest if rest else "")
    RESULTS.write_text(new, encoding="utf-8")
    print(f"wrote {os.path.relpath(RESULTS)}")


# --------------------------------------------------------------------------- main


def check_replicas() -> None:
    """The workers replicate two simulator rules: make sure they still agree."""
    from stable_openai.simulator import _wire

    for i in (0, 1, 7, 12345):
        for sized in (False, True):
            text, max_tokens = _harness.prompt(i, sized)
            assert _harness.expected(text) == echo_answer(text), "echo rule drifted"
            cost = _wire.chat_request_cost([{"role": "user", "content": text}], max_tokens)
            assert _harness.request_tokens(text, max_tokens) == cost, "token rule drifted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="a,b,c,d",
                        help="comma-separated scenarios to run (default: a,b,c,d)")
    parser.add_argument("--duration", type=float, default=6.0,
                        help="seconds each contender runs (default: 6)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds a call begun before the end may take to finish")
    parser.add_argument("--tasks", type=int, default=500,
                        help="coroutines of the async contender (default: 500)")
    parser.add_argument("--skip-external", action="store_true",
                        help="run only stable_openai's contenders")
    parser.add_argument("--in-process", action="store_true",
                        help="run stable_openai's contenders in this process, beside the "
                        "simulator, instead of one subprocess each")
    parser.add_argument("--save", action="store_true",
                        help="write the tables into benchmarks/RESULTS.md (## Throughput)")
    args = parser.parse_args()
    known = scenarios()
    names = [n.strip() for n in args.scenario.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
                     f"choose from {', '.join(known)}")
    if args.duration <= 0 or args.grace < 0 or args.tasks < 1:
        parser.error("--duration must be > 0, --grace >= 0, --tasks >= 1")

    check_replicas()
    logging.getLogger("stable_openai").addHandler(logging.NullHandler())  # "key disabled" lines
    began = time.monotonic()
    venvs: list[Venv] = []
    if not args.skip_external:
        venvs = [ensure_venv(dataclasses.replace(spec)) for spec in VENV_SPECS]
        for venv in venvs:
            found = ", ".join(f"{k} {v}" for k, v in venv.installed.items())
            print(f"{venv.name} venv: {found or venv.problem}")
    setup = time.monotonic() - began
    entries = contenders(args.tasks, venvs)
    print(f"python {platform.python_version()}, {cpu_model()}, {os.cpu_count()} cores; "
          f"stable-openai {ours_version}, openai {openai.__version__}; "
          f"{args.duration:g} s per contender")

    sections: list[tuple[Scenario, list[Row], str]] = []
    for name in names:
        scenario = known[name]
        outcomes = run_scenario(scenario, entries, args)
        rows = [summarize(o, scenario, args.duration) for o in outcomes]
        versus = versus_litellm(rows, entries)
        print(f"\n{heading(scenario)}")
        print(text_table(rows))
        print(versus, flush=True)
        sections.append((scenario, rows, versus))
    total = time.monotonic() - began
    print(f"\n{total:.0f} s in all ({setup:.0f} s of it checking or making the venvs)")
    if args.save:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        save(sections, venvs, command, total, args.duration, args.in_process)


if __name__ == "__main__":
    main()
