"""The public surface, pinned: adding or removing a public name must be a decision.

When this fails because of a planned change, update the lists below in the same commit.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import stable_openai
import stable_openai.simulator

ROOT = Path(__file__).resolve().parents[1]

STABLE_OPENAI_ALL = [
    "AllKeysCoolingError",
    "AllKeysDisabledError",
    "CallTimeoutError",
    "Key",
    "KeyManager",
    "KeyStats",
    "NoKeysError",
    "StableOpenAIError",
    "__version__",
    "stable",
]

# Names public by accident of how ``__init__.py`` imports (none now: it imports
# importlib.metadata under a private name and has no ``from __future__`` import).
STABLE_OPENAI_INCIDENTAL: list[str] = []

SIMULATOR_ALL = [
    "Faults",
    "ModelLimits",
    "ProjectLimits",
    "SimKey",
    "Simulator",
    "SimulatorConfig",
    "echo_answer",
]
SIMULATOR_INCIDENTAL: list[str] = []


def public_names(module: ModuleType) -> list[str]:
    """``dir(module)`` without private and dunder names and without submodules (which
    appear as attributes once something imports them)."""
    return sorted(
        name
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    )


def test_stable_openai_all_is_pinned() -> None:
    assert sorted(stable_openai.__all__) == STABLE_OPENAI_ALL
    assert len(set(stable_openai.__all__)) == len(stable_openai.__all__)
    for name in stable_openai.__all__:
        assert hasattr(stable_openai, name), name


def test_stable_openai_namespace_is_pinned() -> None:
    expected = sorted(
        [name for name in STABLE_OPENAI_ALL if not name.startswith("_")]
        + STABLE_OPENAI_INCIDENTAL
    )
    assert public_names(stable_openai) == expected


def test_simulator_all_is_pinned() -> None:
    assert sorted(stable_openai.simulator.__all__) == SIMULATOR_ALL
    for name in stable_openai.simulator.__all__:
        assert hasattr(stable_openai.simulator, name), name


def test_simulator_namespace_is_pinned() -> None:
    expected = sorted(SIMULATOR_ALL + SIMULATOR_INCIDENTAL)
    assert public_names(stable_openai.simulator) == expected


def test_star_import_gives_exactly_all() -> None:
    """``from stable_openai import *`` in a fresh interpreter binds exactly ``__all__``."""
    code = (
        "before = set(globals())\n"
        "from stable_openai import *\n"
        "print(' '.join(sorted(set(globals()) - before - {'before'})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == STABLE_OPENAI_ALL


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.05, "0.05s"), (12.43, "12.4s"), (59.4, "59.4s"), (90, "1m30s"), (3600, "1h"),
     (3661, "1h1m1s"), (86400, "24h"), (float("inf"), "never"), (0.0, "0s")],
)
def test_durations_in_messages_are_written_as_people_read_them(
    seconds: float, shown: str
) -> None:
    from stable_openai._errors import duration

    assert duration(seconds) == shown


def test_a_cooling_error_says_its_wait_in_hours_not_in_exponents() -> None:
    from stable_openai import AllKeysCoolingError

    error = AllKeysCoolingError(3600.0, 2, {"no quota (429 insufficient_quota)": 2})
    assert "ready in 1h," in str(error) and "e+" not in str(error)
