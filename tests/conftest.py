from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from stable_openai import KeyManager
from stable_openai.simulator import Simulator, SimulatorConfig


@pytest.fixture(autouse=True)
def fresh_manager() -> Iterator[None]:
    """Every test starts and ends without a KeyManager singleton."""
    KeyManager.reset()
    yield
    KeyManager.reset()


@pytest.fixture
def start_simulator() -> Iterator[Callable[[SimulatorConfig], Simulator]]:
    """Start simulators on loopback for one test; every one is stopped at teardown."""
    started: list[Simulator] = []

    def start(config: SimulatorConfig) -> Simulator:
        sim = Simulator(config).start()
        started.append(sim)
        return sim

    yield start
    for sim in reversed(started):
        sim.stop()
