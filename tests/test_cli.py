"""The command line, ``python -m stable_openai {demo,check,simulate}``, run as real processes.

The simulator runs in the test process (for ``check``) or in the child (``demo``,
``simulate``); every request stays on loopback, every key is made up, every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from wire import made_up_keys

import stable_openai
from stable_openai.simulator import Faults, SimKey, Simulator, SimulatorConfig, echo_answer

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9/v1"
StartSimulator = Callable[[SimulatorConfig], Simulator]

VALID, REVOKED, NO_QUOTA, FORBIDDEN, VALID2 = made_up_keys(5, "cli")
SIM_KEYS = (
    SimKey(VALID, project="p1", organization="org-one"),
    SimKey(REVOKED, project="p2", status="revoked"),
    SimKey(NO_QUOTA, project="p3", status="no_quota"),
    SimKey(FORBIDDEN, project="p4", status="forbidden"),
    SimKey(VALID2, project="p5", organization="org-five"),
)


def mask(key: str) -> str:
    """How the CLI shows a key: ``sk-…WXYZ``."""
    return f"{key[:3]}…{key[-4:]}"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no OPENAI_* of ours, and a base URL that goes nowhere, so
    that nothing can ever reach the real service."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    env["OPENAI_BASE_URL"] = UNREACHABLE
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stable_openai", *args],
        cwd=ROOT,
        env=env or child_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sim(start_simulator: StartSimulator) -> Simulator:
    return start_simulator(SimulatorConfig(keys=SIM_KEYS, window=1.0))


def rows_by_key(stdout: str) -> dict[str, str]:
    """The check table: masked key -> its whole row."""
    rows: dict[str, str] = {}
    for line in stdout.splitlines():
        first = line.split("  ", 1)[0]
        if "…" in first:
            rows[first] = line
    return rows


def status_of(row: str) -> str:
    return re.split(r"\s{2,}", row.strip())[1]


def assert_no_whole_key(text: str) -> None:
    for key in (VALID, REVOKED, NO_QUOTA, FORBIDDEN, VALID2):
        assert key not in text


# --------------------------------------------------------------------------- --version


def test_version() -> None:
    done = cli("--version", timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"stable-openai {stable_openai.__version__}"


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize("mode", [["--threads", "8"], ["--async"]])
def test_demo_gets_every_answer_right(mode: list[str]) -> None:
    done = cli("demo", "--calls", "60", *mode)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "answers right    60/60" in done.stdout
    assert "calls failed" not in done.stdout
    assert "Traceback" not in done.stderr
    for match in re.finditer(r"sk-demo-\S+", done.stdout + done.stderr):
        pytest.fail(f"a whole demo key was printed: {match.group()}")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--calls", "0"], "--calls must be at least 1"),
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--window", "0"], "--window must be between"),
    ],
)
def test_demo_bad_option_exits_2_with_a_message(option: list[str], message: str) -> None:
    done = cli("demo", *option, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_demo_unparsable_option_is_an_argparse_error() -> None:
    done = cli("demo", "--calls", "many", timeout=60)
    assert done.returncode == 2
    assert "invalid int value" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- check


def test_check_reports_each_key_masked_and_exits_1(sim: Simulator) -> None:
    done = cli("check", VALID, REVOKED, NO_QUOTA, FORBIDDEN, "--base-url", sim.base_url)

    assert done.returncode == 1, done.stdout + done.stderr
    rows = rows_by_key(done.stdout)
    assert {masked: status_of(line) for masked, line in rows.items()} == {
        mask(VALID): "valid",
        mask(REVOKED): "revoked",
        mask(NO_QUOTA): "no quota",
        mask(FORBIDDEN): "forbidden",
    }
    assert "org-one" in rows[mask(VALID)]
    assert "1 of 4 key(s) usable" in done.stdout
    assert "Traceback" not in done.stderr
    assert_no_whole_key(done.stdout + done.stderr)
    # one tiny request per key, no more
    assert sim.stats()["totals"]["requests"] == 4


def test_check_with_only_valid_keys_exits_0(sim: Simulator) -> None:
    done = cli("check", VALID, VALID2, "--base-url", sim.base_url)
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = [status_of(line) for line in rows_by_key(done.stdout).values()]
    assert statuses == ["valid", "valid"]
    assert "2 of 2 key(s) usable" in done.stdout
    assert_no_whole_key(done.stdout + done.stderr)


def test_check_reports_a_rate_limited_key_as_usable(start_simulator: StartSimulator) -> None:
    limited = start_simulator(
        SimulatorConfig(keys=(SimKey(VALID, project="p1"),), faults=Faults(rate_limit=1.0))
    )
    done = cli("check", VALID, "--base-url", limited.base_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [status_of(line) for line in rows_by_key(done.stdout).values()] == ["rate-limited"]
    assert "1 of 1 key(s) usable" in done.stdout


def test_check_models_only(sim: Simulator) -> None:
    done = cli("check", VALID, REVOKED, "--models-only", "--base-url", sim.base_url)
    assert done.returncode == 1
    statuses = {masked: status_of(line) for masked, line in rows_by_key(done.stdout).items()}
    assert statuses == {mask(VALID): "valid", mask(REVOKED): "revoked"}


def test_check_unreachable_server() -> None:
    done = cli("check", VALID, "--base-url", UNREACHABLE, "--timeout", "5")
    assert done.returncode == 1
    rows = rows_by_key(done.stdout)
    assert [status_of(line) for line in rows.values()] == ["unreachable"]
    assert "Traceback" not in done.stderr
    assert_no_whole_key(done.stdout + done.stderr)


def test_check_keys_from_a_file(sim: Simulator, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# my keys\n{VALID}\n\n{REVOKED}  # old one\n", encoding="utf-8")
    done = cli("check", "--file", str(keys), "--base-url", sim.base_url)
    assert done.returncode == 1
    statuses = {masked: status_of(line) for masked, line in rows_by_key(done.stdout).items()}
    assert statuses == {mask(VALID): "valid", mask(REVOKED): "revoked"}
    assert_no_whole_key(done.stdout + done.stderr)


def test_check_keys_from_stdin(sim: Simulator) -> None:
    done = cli("check", "--file", "-", "--base-url", sim.base_url, stdin=f"{VALID}\n{VALID2}\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(rows_by_key(done.stdout)) == 2


def test_check_keys_from_the_environment(sim: Simulator) -> None:
    env = child_env(OPENAI_API_KEYS=f"{VALID}, {NO_QUOTA}", OPENAI_BASE_URL=sim.base_url)
    done = cli("check", env=env)
    assert done.returncode == 1
    statuses = {masked: status_of(line) for masked, line in rows_by_key(done.stdout).items()}
    assert statuses == {mask(VALID): "valid", mask(NO_QUOTA): "no quota"}
    assert_no_whole_key(done.stdout + done.stderr)


def test_check_without_any_key_exits_2_with_a_message() -> None:
    done = cli("check", "--base-url", UNREACHABLE, timeout=60)
    assert done.returncode == 2
    assert "stable-openai check:" in done.stderr
    assert "API key" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_missing_key_file_exits_2(tmp_path: Path) -> None:
    done = cli("check", "--file", str(tmp_path / "nope.txt"), "--base-url", UNREACHABLE, timeout=60)
    assert done.returncode == 2
    assert "nope.txt" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- simulate


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or fail after ``timeout`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no output within {timeout}s")
    return process.stdout.readline()


@pytest.fixture
def popen() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start children; any still running at teardown is killed and reaped."""
    children: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "stable_openai", *args],
            cwd=ROOT, env=child_env(), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        children.append(process)
        return process

    yield start
    for process in children:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_simulate_serves_the_openai_client_and_stops_on_sigint(
    popen: Callable[..., subprocess.Popen[str]],
) -> None:
    process = popen("simulate", "--key", f"{VALID}:proj", "--key", f"{REVOKED}:proj:revoked",
                    "--rpm", "50", "--window", "1", "--port", "0")

    line = read_line(process, timeout=30)
    match = re.fullmatch(r"stable-openai simulator listening on (http://127\.0\.0\.1:\d+/v1)\n",
                         line)
    assert match, line
    with openai.OpenAI(api_key=VALID, base_url=match.group(1), max_retries=0) as client:
        response = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert response.choices[0].message.content == echo_answer("hi")
        with pytest.raises(openai.AuthenticationError):
            client.with_options(api_key=REVOKED).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )

    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=15)

    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "project=proj" in stderr
    assert_no_whole_key(line + stdout + stderr)


def test_simulate_without_keys_exits_2() -> None:
    done = cli("simulate", "--port", "0", timeout=60)
    assert done.returncode == 2
    assert "no keys configured" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [[], ["demo"], ["check"], ["simulate"]])
def test_help_is_plain_text_for_users(command: list[str]) -> None:
    """No reStructuredText backticks, no notes meant for the library's developers."""
    from stable_openai.__main__ import build_parser

    parser = build_parser()
    target = parser
    if command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        target = sub.choices[command[0]]
    text = target.format_help()
    assert "``" not in text
    assert "add_arguments" not in text and "python -m stable_openai.simulator._cli" not in text
