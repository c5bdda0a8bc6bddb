"""stable_openai: use several OpenAI API keys at once, safely.

Three lines: ``KeyManager(api_keys)`` at start-up, ``@stable`` on the function that calls
OpenAI, and an ``api_key`` parameter on that function.
"""

import importlib.metadata as _metadata

from ._decorator import stable
from ._errors import (
    AllKeysCoolingError,
    AllKeysDisabledError,
    CallTimeoutError,
    NoKeysError,
    StableOpenAIError,
)
from ._keys import Key
from ._manager import KeyManager, KeyStats

try:
    __version__ = _metadata.version("stable-openai")
except _metadata.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
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
