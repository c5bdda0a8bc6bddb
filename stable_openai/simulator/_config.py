"""Configuration of the simulator: keys, per-project limits, faults.

All classes are frozen and validate themselves on construction, so a bad value fails where it is
written rather than deep inside a request. ``SimulatorConfig.from_dict`` reads the JSON shape the
CLI's ``--config`` file uses and names the offending field (``keys[2].status``) on bad input.
Error messages never contain a whole API key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, TypeVar

from ._wire import key_label

KEY_STATUSES = ("ok", "revoked", "no_quota", "forbidden")
"""``ok`` answers; ``revoked`` gets 401 invalid_api_key; ``no_quota`` gets 429
insufficient_quota; ``forbidden`` gets 403 unsupported_country_region_territory."""

_T = TypeVar("_T")


def _check_str(name: str, value: object, *, secret: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name}: must not be empty")
    if not secret and value != value.strip():
        raise ValueError(f"{name}: must not start or end with whitespace, got {value!r}")


def _check_status(name: str, value: object) -> None:
    _check_str(name, value)
    if value not in KEY_STATUSES:
        allowed = ", ".join(repr(s) for s in KEY_STATUSES)
        raise ValueError(f"{name}: must be one of {allowed}; got {value!r}")


def _check_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: must be a positive integer or null, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be a positive integer or null, got {value}")


def _check_number(name: str, value: object, *, low: float, high: float | None = None,
                  low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < low or (low_open and value == low) or (
        high is not None and value > high
    ):
        if high is not None:
            raise ValueError(f"{name}: must be between {low} and {high}, got {value}")
        relation = ">" if low_open else ">="
        raise ValueError(f"{name}: must be a finite number {relation} {low}, got {value}")


@dataclass(frozen=True, repr=False)
class SimKey:
    """One API key the simulator knows.

    Keys of one ``project`` share one budget, as on the real service; ``organization`` is what
    the ``openai-organization`` header and 429 messages name.
    """

    key: str
    project: str = "proj-default"
    organization: str = "org-sim"
    status: str = "ok"

    def __post_init__(self) -> None:
        _check_str("key", self.key, secret=True)
        if any(c.isspace() for c in self.key):
            raise ValueError("key: must not contain whitespace")
        _check_str("project", self.project)
        _check_str("organization", self.organization)
        _check_status("status", self.status)

    def __repr__(self) -> str:
        # Never show the whole key, not even in a traceback or a log line.
        return (
            f"SimKey(key={key_label(self.key)!r}, project={self.project!r}, "
            f"organization={self.organization!r}, status={self.status!r})"
        )


@dataclass(frozen=True)
class ProjectLimits:
    """Per-window limits of one project; ``None`` means unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        _check_limit("rpm", self.rpm)
        _check_limit("tpm", self.tpm)


@dataclass(frozen=True)
class Faults:
    """Probabilities of injected faults, drawn per admitted request."""

    error_500: float = 0.0
    error_503: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 1.0
    drop: float = 0.0
    rate_limit: float = 0.0

    def __post_init__(self) -> None:
        for name in ("error_500", "error_503", "slow", "drop", "rate_limit"):
            _check_number(name, getattr(self, name), low=0.0, high=1.0)
        _check_number("slow_seconds", self.slow_seconds, low=0.0)


_CONFIG_FIELDS = ("keys", "projects", "window", "latency", "faults", "retry_after_ms", "seed")


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that decides how the simulator answers.

    ``window`` is the length in seconds of one rate-limit window (the real service's "minute");
    a test can set it to 1.0 or less. ``latency`` is added to every admitted request.
    """

    keys: tuple[SimKey, ...] = ()
    projects: Mapping[str, ProjectLimits] = field(default_factory=dict, hash=False)
    window: float = 60.0
    latency: float = 0.0
    faults: Faults = Faults()
    retry_after_ms: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        keys: Any = self.keys
        if isinstance(keys, (str, bytes)) or not isinstance(keys, (tuple, list)):
            raise TypeError(f"keys: must be a sequence of SimKey, got {type(keys).__name__}")
        seen: dict[str, int] = {}
        for index, item in enumerate(keys):
            if not isinstance(item, SimKey):
                raise TypeError(f"keys[{index}]: must be a SimKey, got {type(item).__name__}")
            if item.key in seen:
                raise ValueError(
                    f"keys[{index}].key: duplicate of keys[{seen[item.key]}] "
                    f"({key_label(item.key)})"
                )
            seen[item.key] = index
        object.__setattr__(self, "keys", tuple(keys))

        projects: Any = self.projects
        if not isinstance(projects, Mapping):
            raise TypeError(f"projects: must be a mapping, got {type(projects).__name__}")
        for name, limits in projects.items():
            _check_str(f"projects[{name!r}]", name)
            if not isinstance(limits, ProjectLimits):
                raise TypeError(
                    f"projects[{name!r}]: must be ProjectLimits, got {type(limits).__name__}"
                )
        object.__setattr__(self, "projects", MappingProxyType(dict(projects)))

        _check_number("window", self.window, low=0.0, low_open=True)
        _check_number("latency", self.latency, low=0.0)
        if not isinstance(self.faults, Faults):
            raise TypeError(f"faults: must be Faults, got {type(self.faults).__name__}")
        if not isinstance(self.retry_after_ms, bool):
            raise TypeError(
                f"retry_after_ms: must be a boolean, got {type(self.retry_after_ms).__name__}"
            )
        seed: Any = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: must be an integer or null, got {type(seed).__name__}")

    def key(self, key: str) -> SimKey | None:
        """The configured ``SimKey`` for an API key string, if any."""
        for item in self.keys:
            if item.key == key:
                return item
        return None

    def limits(self, project: str) -> ProjectLimits:
        """Limits of ``project`` (unlimited if it has no entry)."""
        return self.projects.get(project, _UNLIMITED)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorConfig:
        """Build from the JSON shape (see ``to_dict``), naming the field on bad input.

        ``keys`` items may be objects ``{"key", "project", "organization", "status"}`` or plain
        strings (a key of the default project). Unknown fields are rejected so typos surface.
        Raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value.
        """
        _check_mapping("config", data, _CONFIG_FIELDS)
        kwargs: dict[str, Any] = {}

        if "keys" in data:
            raw_keys = data["keys"]
            if isinstance(raw_keys, (str, bytes)) or not isinstance(raw_keys, (list, tuple)):
                raise TypeError(f"keys: must be a list, got {type(raw_keys).__name__}")
            keys: list[SimKey] = []
            for index, item in enumerate(raw_keys):
                where = f"keys[{index}]"
                if isinstance(item, str):
                    keys.append(_build(where, SimKey, item))
                    continue
                _check_mapping(where, item, ("key", "project", "organization", "status"))
                if "key" not in item:
                    raise ValueError(f"{where}.key: is required")
                keys.append(_build(where, SimKey, **item))
            kwargs["keys"] = tuple(keys)

        if "projects" in data:
            raw_projects = data["projects"]
            if not isinstance(raw_projects, Mapping):
                raise TypeError(f"projects: must be an object, got {type(raw_projects).__name__}")
            projects: dict[str, ProjectLimits] = {}
            for name, item in raw_projects.items():
                where = f"projects[{name!r}]"
                _check_mapping(where, item, ("rpm", "tpm"))
                projects[name] = _build(where, ProjectLimits, **item)
            kwargs["projects"] = projects

        if "faults" in data:
            raw_faults = data["faults"]
            _check_mapping("faults", raw_faults, tuple(Faults.__dataclass_fields__))
            kwargs["faults"] = _build("faults", Faults, **raw_faults)

        for name in ("window", "latency", "retry_after_ms", "seed"):
            if name in data:
                kwargs[name] = data[name]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape ``from_dict`` reads. It holds the whole keys: keep it private."""
        return {
            "keys": [
                {
                    "key": k.key,
                    "project": k.project,
                    "organization": k.organization,
                    "status": k.status,
                }
                for k in self.keys
            ],
            "projects": {
                name: {"rpm": limits.rpm, "tpm": limits.tpm}
                for name, limits in self.projects.items()
            },
            "window": self.window,
            "latency": self.latency,
            "faults": {
                "error_500": self.faults.error_500,
                "error_503": self.faults.error_503,
                "slow": self.faults.slow,
                "slow_seconds": self.faults.slow_seconds,
                "drop": self.faults.drop,
                "rate_limit": self.faults.rate_limit,
            },
            "retry_after_ms": self.retry_after_ms,
            "seed": self.seed,
        }


_UNLIMITED = ProjectLimits()


def _check_mapping(where: str, value: object, allowed: tuple[str, ...]) -> None:
    """``value`` must be a mapping with string keys drawn from ``allowed``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{where}: must be an object, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str) or name not in allowed:
            raise ValueError(
                f"{where}: unknown field {name!r} (expected one of {', '.join(allowed)})"
            )


def _build(where: str, make: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``make(*args, **kwargs)``, prefixing any validation error with the item's path."""
    try:
        return make(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{where}.{exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
