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

from . import _limiter
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


LIMIT_KINDS = ("rpm", "tpm", "rpd", "tpd")
"""Requests and tokens per minute (one ``window``) and per day (``DAY_WINDOWS`` windows)."""

DAY_WINDOWS = 1440
"""A simulated day is 1440 simulated minutes: with ``window=1.0`` it lasts 24 real minutes."""


@dataclass(frozen=True)
class ModelLimits:
    """Limits of one model, or of a family of models that share one limit.

    Every model named in ``models`` draws on the same budget, as OpenAI's "shared limits" do;
    ``None`` means unlimited. A model named by no ``ModelLimits`` of its project uses the
    project's own limits (all such models together).
    """

    models: tuple[str, ...]
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None

    def __post_init__(self) -> None:
        models: Any = self.models
        if isinstance(models, str):
            models = (models,)
        if not isinstance(models, (tuple, list)) or not models:
            raise TypeError("models: must be a non-empty list of model names")
        for index, name in enumerate(models):
            _check_str(f"models[{index}]", name)
        if len(set(models)) != len(models):
            raise ValueError(f"models: a model is named twice in {list(models)!r}")
        object.__setattr__(self, "models", tuple(models))
        for kind in LIMIT_KINDS:
            _check_limit(kind, getattr(self, kind))


@dataclass(frozen=True)
class ProjectLimits:
    """Limits of one project; ``None`` means unlimited.

    ``rpm``/``tpm`` count per ``window`` (the simulated minute), ``rpd``/``tpd`` per simulated
    day; a request must fit every limit that applies. ``per_model`` gives models (or families)
    budgets of their own; every other model shares the project-level limits.
    """

    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    tpd: int | None = None
    per_model: tuple[ModelLimits, ...] = ()

    def __post_init__(self) -> None:
        for kind in LIMIT_KINDS:
            _check_limit(kind, getattr(self, kind))
        groups: Any = self.per_model
        if isinstance(groups, ModelLimits):
            groups = (groups,)
        if isinstance(groups, (str, bytes)) or not isinstance(groups, (tuple, list)):
            raise TypeError(
                f"per_model: must be a list of ModelLimits, got {type(groups).__name__}"
            )
        seen: set[str] = set()
        for index, group in enumerate(groups):
            if not isinstance(group, ModelLimits):
                raise TypeError(
                    f"per_model[{index}]: must be ModelLimits, got {type(group).__name__}"
                )
            twice = seen.intersection(group.models)
            if twice:
                raise ValueError(
                    f"per_model[{index}]: model {sorted(twice)[0]!r} already has limits"
                )
            seen.update(group.models)
        object.__setattr__(self, "per_model", tuple(groups))

    def pool(self, model: str) -> tuple[tuple[str, ...], Mapping[str, int]]:
        """The budget ``model`` draws on: its family's models (``()`` for the project-level
        pool) and the limits that are set, by kind."""
        for group in self.per_model:
            if model in group.models:
                return group.models, _set_limits(group)
        return (), _set_limits(self)


def _set_limits(limits: ProjectLimits | ModelLimits) -> dict[str, int]:
    return {
        kind: value for kind in LIMIT_KINDS if (value := getattr(limits, kind)) is not None
    }


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


LIMITERS = _limiter.LIMITERS
"""``bucket``: OpenAI's continuously refilling buckets (the default); ``fixed``: fixed windows
(Azure's per-minute TPM); ``sliding``: a sliding window. See ``_limiter``."""

PROFILES = ("openai", "azure", "bare", "openrouter", "gemini")
"""What the simulator says about budgets, as real servers differ:

- ``openai``: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` on every answer
  (describing the daily limit where one is set), OpenAI's 429 bodies;
- ``azure``: only ``x-ratelimit-remaining-{requests,tokens}`` on successes; 429s carry Azure's
  body (``"code": "429"``, no type, "Please retry after N seconds") and ``retry-after`` with
  ``retry-after-ms``;
- ``bare``: no ``x-ratelimit-*`` anywhere; 429s with OpenAI's body;
- ``openrouter``: no ``x-ratelimit-*``; 429 ``{"error": {"code": 429, "message": "Rate limit
  exceeded", "metadata": {...}}}``, no numbers;
- ``gemini``: no ``x-ratelimit-*``; 429 is a JSON array ``[{"error": {"code": 429, "status":
  "RESOURCE_EXHAUSTED", ...}}]``, no numbers.

``retry-after`` goes on rate-limit 429s in every profile unless ``retry_after=False``.
"""

_CONFIG_FIELDS = (
    "keys",
    "projects",
    "window",
    "latency",
    "faults",
    "limiter",
    "count_rejected",
    "profile",
    "retry_after",
    "retry_after_ms",
    "seed",
)


@dataclass(frozen=True)
class SimulatorConfig:
    """Everything that decides how the simulator answers.

    ``window`` is the length in seconds of the simulated minute (a day is ``DAY_WINDOWS`` of
    them); a test can set it to 1.0 or less, and every duration the simulator reports —
    ``x-ratelimit-reset-*``, "Please try again in", ``retry-after`` — is on that compressed
    clock. ``latency`` is added to every admitted request.

    ``limiter`` picks how limits count (``LIMITERS``; ``bucket``, OpenAI's, by default);
    ``count_rejected`` makes a rejected request count against the per-minute limits it was
    measured against, as on the real service (default on). ``profile`` picks which budget
    headers and 429 bodies are sent (``PROFILES``); ``retry_after`` sends ``retry-after`` on
    rate-limit 429s, ``retry_after_ms`` also ``retry-after-ms`` (the ``azure`` profile always
    does).
    """

    keys: tuple[SimKey, ...] = ()
    projects: Mapping[str, ProjectLimits] = field(default_factory=dict, hash=False)
    window: float = 60.0
    latency: float = 0.0
    faults: Faults = Faults()
    limiter: str = "bucket"
    count_rejected: bool = True
    profile: str = "openai"
    retry_after: bool = True
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
        _check_choice("limiter", self.limiter, LIMITERS)
        _check_choice("profile", self.profile, PROFILES)
        for name in ("count_rejected", "retry_after", "retry_after_ms"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}: must be a boolean, got {type(value).__name__}")
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
                _check_mapping(where, item, (*LIMIT_KINDS, "per_model"))
                fields = dict(item)
                if "per_model" in fields:
                    fields["per_model"] = _model_limits(where, fields["per_model"])
                projects[name] = _build(where, ProjectLimits, **fields)
            kwargs["projects"] = projects

        if "faults" in data:
            raw_faults = data["faults"]
            _check_mapping("faults", raw_faults, tuple(Faults.__dataclass_fields__))
            kwargs["faults"] = _build("faults", Faults, **raw_faults)

        for name in _CONFIG_FIELDS:
            if name in data and name not in ("keys", "projects", "faults"):
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
                name: {
                    **{kind: getattr(limits, kind) for kind in LIMIT_KINDS},
                    "per_model": [
                        {"models": list(group.models),
                         **{kind: getattr(group, kind) for kind in LIMIT_KINDS}}
                        for group in limits.per_model
                    ],
                }
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
            "limiter": self.limiter,
            "count_rejected": self.count_rejected,
            "profile": self.profile,
            "retry_after": self.retry_after,
            "retry_after_ms": self.retry_after_ms,
            "seed": self.seed,
        }


_UNLIMITED = ProjectLimits()


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{name}: must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}"
        )


def _model_limits(where: str, raw: object) -> tuple[ModelLimits, ...]:
    """``per_model`` of the JSON shape: a list of ``{"models": [...], "rpm": ..., ...}``."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
        raise TypeError(f"{where}.per_model: must be a list, got {type(raw).__name__}")
    groups: list[ModelLimits] = []
    for index, item in enumerate(raw):
        at = f"{where}.per_model[{index}]"
        _check_mapping(at, item, ("models", *LIMIT_KINDS))
        if "models" not in item:
            raise ValueError(f"{at}.models: is required")
        groups.append(_build(at, ModelLimits, **item))
    return tuple(groups)


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
