from __future__ import annotations

from collections.abc import Iterator

import pytest

from stable_openai import KeyManager


@pytest.fixture(autouse=True)
def fresh_manager() -> Iterator[None]:
    """Every test starts and ends without a KeyManager singleton."""
    KeyManager.reset()
    yield
    KeyManager.reset()

