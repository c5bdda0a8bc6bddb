"""Throughput under rate limits: a matrix of server behaviours × modes × contenders.

Every cell runs one contender in one mode for a fixed time against the local simulator
(started here, in a thread; each contender in a subprocess of its own), from 16 workers over 4
keys in 4 projects, each project allowing 10 requests per 1-s simulated minute, 20 ms latency.
The server behaviours (rows of tables; ``--behaviour``):

  openai    OpenAI as documented: continuously refilling buckets, rejected requests counted,
            full x-ratelimit-* headers, retry-after on 429s (the simulator's default);
  bare      the same limits, no x-ratelimit-* anywhere (429s keep OpenAI's body, retry-after);
  azure     Azure's profile: remaining-only headers on success, Azure's 429 body with
            retry-after and retry-after-ms, limits counted in fixed windows;
  fixed     OpenAI's headers and bodies, limits counted in fixed windows;
  sliding   OpenAI's headers and bodies, limits counted in sliding windows;
  blind     429s with no numbers at all: OpenRouter's body, no headers, no retry-after;
  models    two models with limits of their own in each project: gpt-3.5-turbo 10 and gpt-4o 2
            per window, 12 and 4 workers;
  daily     gpt-4o (8 workers) with 10 per window and 40 per simulated day in each project,
            spent mid-run, beside gpt-4o-mini (8 workers, 10 per window).

Modes (``--mode``): ``per_call``, the original README's function (``api_key`` injected,
``OpenAI(api_key=api_key)`` built on every call with its default retries); ``per_key`` (one
``OpenAI(max_retries=0)`` per key); ``pooled`` (the library's own clients: stable_openai's
``client`` parameter, LiteLLM's Router); ``async`` (the same from coroutines). Contenders
(``--contender``): ``ours`` (this checkout), ``original`` (stable-openai 0.1.1) and ``litellm``
(its Router, num_retries=3), the last two in virtual environments under benchmarks/.venvs/,
made on first use. A contender that has no such mode says so in its cell.

Columns, per model where a behaviour has two:
- *share*: successes that returned within the run ÷ what the server could admit in it,
  limit × (run time + one window) — a full bucket, or a whole window, at the start is
  admissible too, so a client that meets the nominal rate exactly scores about 0.86 in 6 s;
- *nominal*: successes per second ÷ the limit;
- *429/100*: 429s the simulator sent per 100 successes it sent, over the whole run and after
  its first 2 s;
- *failed*: calls that raised or did not return the simulator's echo (0.1.1 returns None);
- p50/p99 latency over every call that returned.

Each cell starts with the simulator's limits and counters reset (``Simulator.reset_limits``),
0.1 s before a window boundary so that fixed windows admit as much as a bucket would.

    python benchmarks/throughput.py [--quick] [--behaviour openai,bare] [--mode per_key]
                                    [--contender ours,litellm] [--duration 6] [--save]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import _external
import _harness
import openai

from stable_openai import __version__ as ours_version
from stable_openai.simulator import (
    ModelLimits,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    echo_answer,
)

WINDOW = 1.0
LATENCY = 0.02
KEYS = 4
HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
RESULTS = HERE / "RESULTS.md"
PROBE_PROJECT = "bench-probe"
SETUP_TIMEOUT = 180.0  # a subprocess's imports, set-up and warm-up call
LEAD = 0.9 * WINDOW  # from resetting the limits to the start: 0.1 s before a boundary
STEADY_AFTER = 2.0  # "429s after the first 2 s"


# --------------------------------------------------------------------------- behaviours


@dataclass(frozen=True)
class Behaviour:
    name: str
    title: str
    workload: tuple[tuple[str, int], ...]  # (model, workers)
    limits: ProjectLimits  # of each of the KEYS projects
    options: dict[str, Any] = field(default_factory=dict)  # SimulatorConfig fields
    note: str = ""

    @property
    def models(self) -> list[str]:
        return [model for model, _ in self.workload]

    def limit(self, model: str) -> float:
        """Requests per second the server admits for ``model`` in the long run."""
        _, limits = self.limits.pool(model)
        return KEYS * limits["rpm"] / WINDOW

    def sim_keys(self) -> list[SimKey]:
        return [SimKey(f"sk-bench-{self.name}-{i}-{'x' * 24}", project=f"p{i}",
                       organization=f"org-bench-{i}") for i in range(KEYS)]

    @property
    def probe_key(self) -> str:
        return f"sk-bench-{self.name}-probe-{'x' * 24}"

    def simulator_config(self) -> SimulatorConfig:
        probe = SimKey(self.probe_key, project=PROBE_PROJECT, organization="org-bench-probe")
        projects = {key.project: self.limits for key in self.sim_keys()}
        projects[PROBE_PROJECT] = ProjectLimits()
        return SimulatorConfig(keys=(*self.sim_keys(), probe), projects=projects, window=WINDOW,
                               latency=LATENCY, **self.options)


MINI = "gpt-4o-mini"
RPM10 = ProjectLimits(rpm=10)


def behaviours() -> dict[str, Behaviour]:
    one = ((MINI, 16),)
    return {b.name: b for b in (
        Behaviour("openai", "OpenAI default: refilling buckets, rejected requests counted, "
                  "full headers", one, RPM10),
        Behaviour("bare", "OpenAI without budget headers (429s keep OpenAI's body and "
                  "retry-after)", one, RPM10, {"profile": "bare"}),
        Behaviour("azure", "Azure profile: remaining-only headers, Azure 429 body, retry-after "
                  "and retry-after-ms, fixed windows", one, RPM10,
                  {"profile": "azure", "limiter": "fixed"}),
        Behaviour("fixed", "fixed windows, OpenAI's headers", one, RPM10, {"limiter": "fixed"}),
        Behaviour("sliding", "sliding windows, OpenAI's headers", one, RPM10,
                  {"limiter": "sliding"},
                  note="A sliding window admits one window's worth at the start and one per "
                  "window after it, so in a 6-s run even a perfect client scores about 6/7 "
                  "≈ 0.86 of the share."),
        Behaviour("blind", "429s with no numbers: OpenRouter's body, no headers, no "
                  "retry-after", one, RPM10, {"profile": "openrouter", "retry_after": False}),
        Behaviour("models", "two models per project: gpt-3.5-turbo 10 and gpt-4o 2 per "
                  "window, 12 and 4 workers", (("gpt-3.5-turbo", 12), ("gpt-4o", 4)),
                  ProjectLimits(per_model=(ModelLimits(("gpt-3.5-turbo",), rpm=10),
                                           ModelLimits(("gpt-4o",), rpm=2)))),
        Behaviour("daily", "gpt-4o: 10 per window and 40 per simulated day (spent mid-run); "
                  "gpt-4o-mini: 10 per window; 8 workers each", (("gpt-4o", 8), (MINI, 8)),
                  ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=10, rpd=40),
                                           ModelLimits((MINI,), rpm=10))),
                  note="gpt-4o's daily budget (4 × 40) is spent a few seconds in; after that "
                  "the server answers its calls with an RPD 429 to try again in 36 s. Its share "
                  "is of its per-minute limit, which it cannot reach; the cell to read is "
                  "gpt-4o-mini's, and how promptly gpt-4o's calls fail."),
    )}


QUICK = {"behaviour": "openai,bare", "mode": "per_key,pooled"}
CONTENDERS = ("ours", "original", "litellm")
MODES = ("per_call", "per_key", "pooled", "async")
LABELS = {"ours": "stable_openai", "original": "stable-openai 0.1.1",
          "litellm": "LiteLLM Router"}


# --------------------------------------------------------------------------- contenders


class Unavailable(Exception):
    """A contender that cannot run a cell; its message goes in the cell."""


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


# --------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    contender: str
    mode: str
    records: list[list[float]] = field(default_factory=list)
    unfinished: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    served: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> end counters
    early: dict[str, dict[str, int]] = field(default_factory=dict)  # at STEADY_AFTER
    unavailable: str | None = None

    @property
    def label(self) -> str:
        return f"{LABELS[self.contender]} {self.mode}"


def _models_stats(sim: Simulator) -> dict[str, dict[str, int]]:
    return {name: dict(counts) for name, counts in sim.stats()["models"].items()}


def run_cell(behaviour: Behaviour, sim: Simulator, python: Path, cell: Cell,
             duration: float, grace: float) -> None:
    """Run one contender in one mode in a subprocess; fill ``cell``."""
    worker = Worker(python)
    try:
        worker.send(json.dumps({
            "kind": cell.contender, "mode": cell.mode, "base_url": sim.base_url,
            "keys": [k.key for k in behaviour.sim_keys()], "warmup_key": behaviour.probe_key,
            "workload": [list(job) for job in behaviour.workload], "grace": grace,
        }))
        worker.expect("READY", SETUP_TIMEOUT)
        time.sleep(0.2)  # let the warm-up's connection settle
        sim.reset_limits()
        sim.reset_stats()
        start = time.time() + LEAD
        deadline = start + duration
        snapshot = threading.Timer(
            max(0.0, start + STEADY_AFTER - time.time()),
            lambda: cell.early.update(_models_stats(sim)),
        )
        snapshot.start()
        worker.send("GO " + json.dumps({"start": start, "deadline": deadline}))
        try:
            result = worker.expect("RESULT", deadline + grace + 20.0 - time.time())
        finally:
            snapshot.cancel()
        cell.records = result["records"]
        cell.unfinished = int(result["unfinished"])
        cell.errors = dict(result["errors"])
        cell.served = _models_stats(sim)
    finally:
        worker.close()


def mask_keys(text: str, behaviour: Behaviour) -> str:
    for key in (*(k.key for k in behaviour.sim_keys()), behaviour.probe_key):
        text = text.replace(key, key[:8] + "…")
    return text


def run_behaviour(behaviour: Behaviour, cells: list[Cell], pythons: dict[str, Path | str],
                  duration: float, grace: float) -> None:
    with Simulator(behaviour.simulator_config()) as sim:
        for cell in cells:
            print(f"  ({behaviour.name}) {cell.label} ...", end=" ", file=sys.stderr,
                  flush=True)
            python = pythons[cell.contender]
            if cell.mode not in _external.MODES[cell.contender]:
                cell.unavailable = f"n/a: {LABELS[cell.contender]} has no {cell.mode} mode"
            elif isinstance(python, str):
                cell.unavailable = f"n/a: {python}"
            else:
                try:
                    run_cell(behaviour, sim, python, cell, duration, grace)
                except Unavailable as exc:
                    cell.unavailable = mask_keys(str(exc), behaviour)
                except Exception as exc:
                    cell.unavailable = mask_keys(f"error: {type(exc).__name__}: {exc}",
                                                 behaviour)[:200]
            print("done" if cell.unavailable is None else "n/a", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figures:
    """One model's figures in one cell."""

    share: float
    nominal: float
    per100: float | None
    per100_steady: float | None
    failed: int


@dataclass(frozen=True)
class Row:
    label: str
    figures: list[Figures]  # one per model of the behaviour
    p50: float | None
    p99: float | None
    note: str
    unavailable: str | None = None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _per100(limited: int, ok: int) -> float | None:
    """429s per 100 successes; ``None`` when there was no success to count them against."""
    return limited / ok * 100 if ok else None


def summarize(cell: Cell, behaviour: Behaviour, duration: float) -> Row:
    if cell.unavailable is not None:
        return Row(cell.label, [], None, None, "", cell.unavailable)
    figures = []
    for index, model in enumerate(behaviour.models):
        mine = [r for r in cell.records if int(r[4]) == index]
        in_time = sum(1 for r in mine if r[0] and r[2] <= duration)
        limit = behaviour.limit(model)
        end = cell.served.get(model, {})
        early = cell.early.get(model, {})
        limited, ok = end.get("rate_limited", 0), end.get("ok", 0)
        figures.append(Figures(
            share=in_time / (limit * (duration + WINDOW)),
            nominal=in_time / duration / limit,
            per100=_per100(limited, ok),
            per100_steady=_per100(limited - early.get("rate_limited", 0),
                                  ok - early.get("ok", 0)),
            failed=sum(1 for r in mine if not r[0]),
        ))
    notes = [f"{n} {name}" for name, n in sorted(cell.errors.items(), key=lambda e: -e[1])]
    if cell.unfinished:
        notes.append(f"{cell.unfinished} unfinished after the grace period")
    failures = [r[1] for r in cell.records if not r[0]]
    if failures:
        notes.append(f"failures returned in p50 {percentile(failures, 0.5):.0f} ms")
    latencies = [r[1] for r in cell.records]
    return Row(cell.label, figures,
               percentile(latencies, 0.50) if latencies else None,
               percentile(latencies, 0.99) if latencies else None,
               "; ".join(notes[:4]))


HEADERS = ("contender and mode", "share", "nominal", "429/100", "429/100 after 2 s", "failed",
           "p50 ms", "p99 ms", "notes")


def _joined(values: list[str]) -> str:
    return " / ".join(values)


def _rate(value: float | None) -> str:
    return "— (no success)" if value is None else f"{value:.1f}"


def cells_of(row: Row) -> list[str]:
    if row.unavailable is not None:
        return [row.label, row.unavailable, "", "", "", "", "", "", ""]
    f = row.figures
    return [
        row.label,
        _joined([f"{x.share:.2f}" for x in f]),
        _joined([f"{x.nominal:.2f}" for x in f]),
        _joined([_rate(x.per100) for x in f]),
        _joined([_rate(x.per100_steady) for x in f]),
        _joined([str(x.failed) for x in f]),
        "—" if row.p50 is None else f"{row.p50:.0f}",
        "—" if row.p99 is None else f"{row.p99:.0f}",
        row.note,
    ]


def heading(behaviour: Behaviour) -> str:
    limits = ", ".join(f"{model} {behaviour.limit(model):g}/s"
                       for model in behaviour.models)
    return f"({behaviour.name}) {behaviour.title} — limit {limits}"


def text_table(rows: list[Row]) -> str:
    lines = [cells_of(row) for row in rows]
    measured = [list(HEADERS)] + [ln for row, ln in zip(rows, lines) if row.unavailable is None]
    widths = [max(len(line[i]) for line in measured) for i in range(len(HEADERS) - 1)]
    widths[0] = max(widths[0], *(len(row.label) for row in rows))

    def aligned(line: list[str]) -> str:
        parts = [line[0].ljust(widths[0])]
        parts += [cell.rjust(widths[i]) for i, cell in enumerate(line[1:-1], start=1)]
        return "  ".join([*parts, line[-1]]).rstrip()

    out = [aligned(list(HEADERS))]
    for row, line in zip(rows, lines):
        out.append(aligned(line) if row.unavailable is None
                   else f"{row.label:<{widths[0]}}  {row.unavailable}")
    return "\n".join(out)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |",
             "|---|" + "---:|" * (len(HEADERS) - 2) + "---|"]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells_of(row)) + " |")
    return "\n".join(lines)


def best_versus(rows: list[Row], cells: list[Cell], behaviour: Behaviour) -> str:
    """Per model: our best nominal rate beside each other contender's best."""
    parts = []
    for index, model in enumerate(behaviour.models):
        best: dict[str, tuple[float, str]] = {}
        for row, cell in zip(rows, cells):
            if row.unavailable is None:
                value = row.figures[index].nominal
                if value > best.get(cell.contender, (-1.0, ""))[0]:
                    best[cell.contender] = (value, cell.mode)
        if "ours" not in best:
            continue
        ours, mode = best["ours"]
        others = [f"{LABELS[c]} {v:.2f} ({m})" for c, (v, m) in best.items() if c != "ours"]
        name = f"{model}: " if len(behaviour.models) > 1 else ""
        parts.append(f"{name}best of ours {ours:.2f} ({mode})"
                     + (" vs " + ", ".join(others) if others else ""))
    return "Best nominal rate — " + "; ".join(parts) if parts else ""


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


def save(sections: list[tuple[Behaviour, list[Row], str]], pythons: dict[str, Path | str],
         versions: dict[str, dict[str, str]], command: str, seconds: float,
         duration: float) -> None:
    found = []
    for contender in CONTENDERS:
        where = pythons.get(contender)
        if isinstance(where, str):
            found.append(f"{LABELS[contender]}: {where}")
        elif contender in versions:
            listed = ", ".join(f"{k} {v}" for k, v in versions[contender].items())
            found.append(f"{LABELS[contender]}: {listed}")
    cores = os.cpu_count()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        "## Throughput",
        "",
        f"`{command}` — {when}, commit {git_commit()}, {seconds:.0f} s in all.",
        "",
        f"- Machine: Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{cpu_model()}, {cores} cores, {platform.system()} {platform.release()}.",
        f"- Packages: {'; '.join(found)}.",
        f"- Each cell: {duration:g} s, {KEYS} keys in {KEYS} projects, 1-s simulated minute, "
        f"{LATENCY * 1000:g} ms latency, every contender in a subprocess of its own. *share*: "
        "successes in the run ÷ (limit × (run time + one window)), what the server could "
        "admit; *nominal*: successes per second ÷ limit; *429/100*: 429s the simulator sent "
        "per 100 successes it sent, whole run and after the first 2 s; *failed*: calls that "
        "raised or returned anything but the simulator's echo. With two models, figures are "
        "per model in the order of the heading. See the docstring of throughput.py.",
        "",
    ]
    for behaviour, rows, versus in sections:
        body += [f"### {heading(behaviour)}", ""]
        if behaviour.note:
            body += [behaviour.note, ""]
        body += [markdown_table(rows), ""]
        if versus:
            body += [versus, ""]
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


def _choose(parser: argparse.ArgumentParser, option: str, value: str,
            known: tuple[str, ...] | list[str]) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"--{option}: unknown {', '.join(unknown) or '(none)'}; "
                     f"choose from {', '.join(known)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behaviour", help="comma-separated server behaviours (default: all)")
    parser.add_argument("--mode", help="comma-separated modes (default: all)")
    parser.add_argument("--contender", default=",".join(CONTENDERS),
                        help="comma-separated contenders (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the subset {QUICK['behaviour']} × {QUICK['mode']} (unless "
                        "--behaviour/--mode say otherwise), under 3 minutes")
    parser.add_argument("--duration", type=float, default=6.0,
                        help="seconds each cell runs (default: 6)")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds a call begun before the end may take to finish")
    parser.add_argument("--save", action="store_true",
                        help="write the tables into benchmarks/RESULTS.md (## Throughput)")
    args = parser.parse_args()
    known = behaviours()
    default = QUICK if args.quick else {"behaviour": ",".join(known), "mode": ",".join(MODES)}
    names = _choose(parser, "behaviour", args.behaviour or default["behaviour"], list(known))
    modes = _choose(parser, "mode", args.mode or default["mode"], MODES)
    contenders = _choose(parser, "contender", args.contender, CONTENDERS)
    if args.duration <= 0 or args.grace < 0:
        parser.error("--duration must be > 0 and --grace >= 0")

    check_replicas()
    began = time.monotonic()
    pythons: dict[str, Path | str] = {"ours": Path(sys.executable)}
    versions: dict[str, dict[str, str]] = {}
    for spec in VENV_SPECS:
        if spec.name in contenders:
            venv = ensure_venv(dataclasses.replace(spec))
            pythons[spec.name] = venv.python if venv.python is not None else str(venv.problem)
            versions[spec.name] = venv.installed
            print(f"{venv.name} venv: "
                  f"{', '.join(f'{k} {v}' for k, v in venv.installed.items()) or venv.problem}")
    versions["ours"] = {"stable-openai": ours_version, "openai": openai.__version__}
    setup = time.monotonic() - began
    print(f"python {platform.python_version()}, {cpu_model()}, {os.cpu_count()} cores; "
          f"stable-openai {ours_version}, openai {openai.__version__}; "
          f"{args.duration:g} s per cell")

    sections: list[tuple[Behaviour, list[Row], str]] = []
    for name in names:
        behaviour = known[name]
        cells = [Cell(contender, mode) for contender in contenders for mode in modes
                 if mode in _external.MODES[contender] or contender == "ours"]
        cells += [Cell(contender, mode) for contender in contenders for mode in modes
                  if mode not in _external.MODES[contender] and contender != "ours"]
        run_behaviour(behaviour, cells, pythons, args.duration, args.grace)
        rows = [summarize(cell, behaviour, args.duration) for cell in cells]
        versus = best_versus(rows, cells, behaviour)
        print(f"\n{heading(behaviour)}")
        print(text_table(rows))
        if versus:
            print(versus, flush=True)
        sections.append((behaviour, rows, versus))
    total = time.monotonic() - began
    print(f"\n{total:.0f} s in all ({setup:.0f} s of it checking or making the venvs)")
    if args.save:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        save(sections, pythons, versions, command, total, args.duration)


if __name__ == "__main__":
    main()
