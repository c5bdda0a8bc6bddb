"""The simulator's shared state: configuration, limit meters, fault RNG and counters.

One lock guards all of it. Callers hold it only for bookkeeping: never while sleeping or writing
to a socket. The HTTP layer asks for a ``Verdict`` and then does the slow parts outside the lock.

A request draws on one pool of its project: its model's (or model family's) ``ModelLimits``,
or the project-level limits. Each limit of the pool (rpm, tpm, rpd, tpd) is a meter of the
configured ``limiter`` (see ``_limiter``), and a request is admitted only if it fits all of
them. A rejected request names the limit that keeps it out longest, and with
``count_rejected`` uses up what the per-minute meters had left. Token cost is computed by the
caller (see ``_wire.chat_request_cost``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import _limiter, _wire
from ._config import DAY_WINDOWS, KEY_STATUSES, SimKey, SimulatorConfig

KEY_FIELDS = (
    "requests",
    "ok",
    "rate_limited",
    "quota",
    "unauthorized",
    "forbidden",
    "faults",
    "too_large",
    "invalid",
    "in_flight",
    "max_in_flight",
)
"""Counters kept for the totals and for each key. Every request on a valid route counts in
``requests`` and, once answered, in exactly one of the outcome counters (ok ... invalid)."""

PROJECT_FIELDS = ("requests", "ok", "rate_limited", "tokens", "in_flight", "max_in_flight")
"""Counters kept for each project; ``tokens`` is the budget its admitted requests used."""

MODEL_FIELDS = ("requests", "ok", "rate_limited", "too_large", "faults", "tokens")
"""Counters kept for each model named in a budgeted request (from the moment it is parsed)."""

_MINUTE_KINDS = ("rpm", "tpm")

class _Counters:
    """A named set of integer counters with in-flight tracking."""

    __slots__ = ("values",)

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.values: dict[str, int] = dict.fromkeys(fields, 0)

    def add(self, name: str, amount: int = 1) -> None:
        if name in self.values:
            self.values[name] += amount

    def enter(self) -> None:
        self.values["in_flight"] += 1
        if self.values["in_flight"] > self.values["max_in_flight"]:
            self.values["max_in_flight"] = self.values["in_flight"]

    def leave(self) -> None:
        self.values["in_flight"] -= 1

    def reset(self) -> None:
        in_flight = self.values["in_flight"]
        for name in self.values:
            self.values[name] = 0
        self.values["in_flight"] = in_flight
        self.values["max_in_flight"] = in_flight


@dataclass
class Ticket:
    """One request in progress, from ``begin`` to ``end``."""

    request_id: str
    started: float
    sim_key: SimKey | None
    label: str | None
    outcome: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What to do with a request: answer normally (``status`` 200) or with an error body.

    ``delay`` is slept (outside the lock) before answering; ``drop`` closes the connection
    without an answer; ``headers`` go on the answer whatever it is.
    """

    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drop: bool = False


class SimState:
    """Thread-safe bookkeeping behind the HTTP handler (no I/O; clock injectable for tests)."""

    def __init__(
        self, config: SimulatorConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._config = config
        self._start = clock()
        self._rng = random.Random(config.seed)
        self._meters: dict[tuple[str, tuple[str, ...], str, int], _limiter.Meter] = {}
        self._totals = _Counters(KEY_FIELDS)
        self._labels: dict[str, str] = {}
        self._key_counters: dict[str, _Counters] = {}
        self._project_counters: dict[str, _Counters] = {}
        self._model_counters: dict[str, _Counters] = {}
        self._by_key: dict[str, SimKey] = {}
        self._register(config)

    # ----------------------------------------------------------------- configuration

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, config: SimulatorConfig) -> None:
        """Replace the configuration; counters and the usage of unchanged limits are kept.

        The fault RNG is reseeded from ``config.seed``; if the window length or the limiter
        changes, every limit starts afresh now.
        """
        with self._lock:
            if (config.window, config.limiter) != (self._config.window, self._config.limiter):
                self._meters.clear()
                self._start = self._clock()
            self._config = config
            self._rng = random.Random(config.seed)
            self._register(config)

    def reset_limits(self) -> None:
        """Forget every limit's usage and start the windows now, as a fresh server would."""
        with self._lock:
            self._meters.clear()
            self._start = self._clock()

    def set_key_status(self, key: str, status: str) -> None:
        """Change one key's status at runtime (e.g. revoke it mid-run)."""
        if status not in KEY_STATUSES:
            raise ValueError(f"status: must be one of {', '.join(KEY_STATUSES)}; got {status!r}")
        with self._lock:
            current = self._by_key.get(key)
            if current is None:
                raise KeyError(f"unknown key {_wire.key_label(key)}")
            keys = tuple(
                dataclasses.replace(k, status=status) if k.key == key else k
                for k in self._config.keys
            )
            self._config = dataclasses.replace(self._config, keys=keys)
            self._by_key = {k.key: k for k in keys}

    def _register(self, config: SimulatorConfig) -> None:
        """Index the keys of ``config`` and create counters for its keys and projects.

        Called with the lock held (or before the state is shared).
        """
        self._by_key = {k.key: k for k in config.keys}
        taken = set(self._key_counters)
        for sim_key in config.keys:
            if sim_key.key in self._labels:
                continue
            label = _wire.key_label(sim_key.key)
            if label in taken:
                label = f"{label}#{_wire.key_fingerprint(sim_key.key)}"
            taken.add(label)
            self._labels[sim_key.key] = label
            self._key_counters[label] = _Counters(KEY_FIELDS)
        projects = {k.project for k in config.keys} | set(config.projects)
        for project in sorted(projects):
            self._project_counters.setdefault(project, _Counters(PROJECT_FIELDS))

    # ----------------------------------------------------------------- counters

    def stats(self) -> dict[str, Any]:
        """Snapshot of all counters; keys appear by label, never whole."""
        with self._lock:
            return {
                "totals": dict(self._totals.values),
                "keys": {label: dict(c.values) for label, c in self._key_counters.items()},
                "projects": {
                    name: dict(c.values) for name, c in self._project_counters.items()
                },
                "models": {name: dict(c.values) for name, c in self._model_counters.items()},
            }

    def key_stats(self, key: str) -> dict[str, int]:
        """Counters of one key, looked up by the real key string."""
        with self._lock:
            label = self._labels.get(key)
            if label is None:
                raise KeyError(f"unknown key {_wire.key_label(key)}")
            return dict(self._key_counters[label].values)

    def reset_stats(self) -> None:
        """Zero all counters (requests still in flight stay counted as in flight)."""
        with self._lock:
            self._totals.reset()
            for counters in self._key_counters.values():
                counters.reset()
            for counters in self._project_counters.values():
                counters.reset()
            self._model_counters.clear()

    def _scopes(self, ticket: Ticket) -> list[_Counters]:
        scopes = [self._totals]
        if ticket.label is not None:
            scopes.append(self._key_counters[ticket.label])
        return scopes

    def _project_scope(self, ticket: Ticket) -> _Counters | None:
        if ticket.sim_key is None:
            return None
        return self._project_counters.setdefault(
            ticket.sim_key.project, _Counters(PROJECT_FIELDS)
        )

    # ----------------------------------------------------------------- request life cycle

    def begin(self, api_key: str | None) -> Ticket:
        """Count a request on a valid route and mark it in flight."""
        with self._lock:
            sim_key = None if api_key is None else self._by_key.get(api_key)
            label = None if sim_key is None else self._labels.get(sim_key.key)
            ticket = Ticket(_wire.new_request_id(), self._clock(), sim_key, label)
            project = self._project_scope(ticket)
            for counters in [*self._scopes(ticket), *([project] if project else [])]:
                counters.add("requests")
                counters.enter()
            return ticket

    def end(self, ticket: Ticket) -> None:
        """Mark a request no longer in flight."""
        with self._lock:
            project = self._project_scope(ticket)
            for counters in [*self._scopes(ticket), *([project] if project else [])]:
                counters.leave()

    def record(self, ticket: Ticket, outcome: str) -> None:
        """Count the outcome of a request (once; later calls are ignored)."""
        with self._lock:
            self._record(ticket, outcome)

    def _record(self, ticket: Ticket, outcome: str) -> None:
        if ticket.outcome is not None:
            return
        ticket.outcome = outcome
        for counters in self._scopes(ticket):
            counters.add(outcome)
        project = self._project_scope(ticket)
        if project is not None:
            project.add(outcome)
        if ticket.model is not None:
            self._model_scope(ticket.model).add(outcome)

    def _model_scope(self, model: str) -> _Counters:
        counters = self._model_counters.get(model)
        if counters is None:
            counters = self._model_counters[model] = _Counters(MODEL_FIELDS)
        return counters

    def check_key(self, ticket: Ticket, api_key: str | None) -> Verdict | None:
        """Reject a request whose key is missing, unknown, revoked, out of quota or forbidden.

        Returns ``None`` if the key may proceed. Checked before limits; never uses budget.
        """
        with self._lock:
            sim_key = ticket.sim_key
            if sim_key is not None:
                # The status may have changed since ``begin`` (set_key_status).
                sim_key = self._by_key.get(sim_key.key, sim_key)
            headers = self.identity_headers(ticket)
            if api_key is None:
                self._record(ticket, "unauthorized")
                return Verdict(401, _wire.missing_api_key_body(), headers)
            if sim_key is None or sim_key.status == "revoked":
                self._record(ticket, "unauthorized")
                return Verdict(401, _wire.invalid_api_key_body(api_key), headers)
            if sim_key.status == "no_quota":
                self._record(ticket, "quota")
                return Verdict(429, _wire.insufficient_quota_body(), headers)
            if sim_key.status == "forbidden":
                self._record(ticket, "forbidden")
                return Verdict(403, _wire.forbidden_body(), headers)
            return None

    def identity_headers(self, ticket: Ticket) -> tuple[tuple[str, str], ...]:
        """``x-request-id`` and, for a known key, ``openai-organization``/``openai-project``."""
        headers = [("x-request-id", ticket.request_id)]
        if ticket.sim_key is not None:
            headers.append(("openai-organization", ticket.sim_key.organization))
            headers.append(("openai-project", ticket.sim_key.project))
        return tuple(headers)

    def admit(
        self,
        ticket: Ticket,
        model: str,
        cost: int,
        budgeted: bool = True,
        operation: str = "ChatCompletions_Create",
    ) -> Verdict:
        """Apply the limits of the request's pool and draw faults, for a key that passed.

        ``cost`` is the request's token cost; ``budgeted=False`` (e.g. listing models) skips
        the limits. Admitted requests use budget even if a fault then fails them, like a real
        server that did the work. ``operation`` names the request in Azure's 429 body.
        """
        with self._lock:
            config = self._config
            sim_key = ticket.sim_key
            assert sim_key is not None, "admit() needs a key that passed check_key()"
            now = self._clock()
            org = sim_key.organization
            headers = list(self.identity_headers(ticket))
            if not budgeted:
                return self._draw_faults(ticket, operation, model, org, None, headers)

            ticket.model = model
            self._model_scope(model).add("requests")
            meters = self._pool_meters(sim_key.project, model)
            costs = {"rpm": 1, "tpm": cost, "rpd": 1, "tpd": cost}
            for kind in ("tpm", "tpd"):
                meter = meters.get(kind)
                if meter is not None and cost > meter.limit:
                    self._record(ticket, "too_large")
                    body = _wire.too_large_body(model, org, meter.limit, cost, kind)
                    return Verdict(429, body, (*headers, *self._budget(meters, now)))

            if any(meter.wait(costs[kind], now) > 0 for kind, meter in meters.items()):
                if config.count_rejected:
                    for kind in _MINUTE_KINDS:
                        if kind in meters:
                            meters[kind].charge_rejected(costs[kind], now)
                self._record(ticket, "rate_limited")
                return self._rejection(ticket, operation, model, org, meters, costs, headers, now)

            for kind, meter in meters.items():
                meter.charge(costs[kind], now)
            self._model_scope(model).add("tokens", cost)
            project = self._project_scope(ticket)
            if project is not None:
                project.add("tokens", cost)
            headers += self._budget(meters, now)
            return self._draw_faults(ticket, operation, model, org, meters.get("rpm"), headers)

    def _rejection(
        self,
        ticket: Ticket,
        operation: str,
        model: str,
        org: str,
        meters: dict[str, _limiter.Meter],
        costs: dict[str, int],
        headers: list[tuple[str, str]],
        now: float,
    ) -> Verdict:
        """The 429 for a rejected request, naming the limit that keeps it out longest (after
        its own charge): every number in it says when the request would be admitted if
        nothing else came first."""
        config = self._config
        waits = {kind: meter.wait(costs[kind], now) for kind, meter in meters.items()}
        broken = max(waits, key=lambda kind: waits[kind])
        meter = meters[broken]
        wait = waits[broken]
        used = math.ceil(meter.used(now) - _limiter.EPSILON)
        body = _wire.profile_rate_limit_body(
            config.profile, operation, model, org, broken, meter.limit, used, costs[broken], wait
        )
        headers += self._retry_headers(wait)
        headers += self._budget(meters, now)
        return Verdict(429, body, tuple(headers))

    def _retry_headers(self, wait: float) -> list[tuple[str, str]]:
        """``retry-after``/``retry-after-ms`` of a rate-limit 429, as the profile sends them
        (Azure always sends both)."""
        config = self._config
        azure = config.profile == "azure"
        return _wire.retry_headers(
            wait,
            seconds=config.retry_after or azure,
            ms=azure or (config.retry_after and config.retry_after_ms),
        )

    def _pool_meters(self, project: str, model: str) -> dict[str, _limiter.Meter]:
        """The meters of the pool ``model`` draws on in ``project``, made on first use."""
        family, limits = self._config.limits(project).pool(model)
        meters: dict[str, _limiter.Meter] = {}
        for kind, limit in limits.items():
            index = (project, family, kind, limit)
            meter = self._meters.get(index)
            if meter is None:
                period = self._config.window * (1 if kind in _MINUTE_KINDS else DAY_WINDOWS)
                meter = _limiter.make_meter(self._config.limiter, limit, period, self._start)
                self._meters[index] = meter
            meters[kind] = meter
        return meters

    def _budget(self, meters: dict[str, _limiter.Meter], now: float) -> list[tuple[str, str]]:
        """Budget headers of the pool, in the configured profile. Where a daily limit is set,
        the headers describe it instead of the per-minute one (as OpenAI's appear to)."""
        lines: list[_wire.BudgetLine] = []
        for counts, minute, day in (("requests", "rpm", "rpd"), ("tokens", "tpm", "tpd")):
            meter = meters.get(day) or meters.get(minute)
            if meter is not None:
                lines.append((counts, meter.limit, meter.remaining(now), meter.reset_in(now)))
        return _wire.budget_headers(self._config.profile, lines)

    def _draw_faults(
        self,
        ticket: Ticket,
        operation: str,
        model: str,
        org: str,
        rpm: _limiter.Meter | None,
        headers: list[tuple[str, str]],
    ) -> Verdict:
        """Draw each fault in a fixed order (so a seed reproduces a run)."""
        config = self._config
        faults = config.faults
        draws = [self._rng.random() for _ in range(5)]
        delay = config.latency
        if draws[4] < faults.slow:
            delay += faults.slow_seconds
        if draws[0] < faults.drop:
            self._record(ticket, "faults")
            return Verdict(0, None, tuple(headers), delay, drop=True)
        if draws[1] < faults.rate_limit:
            # A spurious 429: the server says a limit is reached though none is.
            self._record(ticket, "faults")
            now = self._clock()
            used = 0 if rpm is None else math.ceil(rpm.used(now) - _limiter.EPSILON)
            limit = used if rpm is None else rpm.limit
            body = _wire.profile_rate_limit_body(
                config.profile, operation, model, org, "rpm", limit, used, 1, 1.0
            )
            headers += self._retry_headers(1.0)
            return Verdict(429, body, tuple(headers), delay)
        if draws[2] < faults.error_500:
            self._record(ticket, "faults")
            return Verdict(500, _wire.server_error_body(ticket.request_id), tuple(headers), delay)
        if draws[3] < faults.error_503:
            self._record(ticket, "faults")
            return Verdict(503, _wire.overloaded_body(ticket.request_id), tuple(headers), delay)
        return Verdict(200, None, tuple(headers), delay)

    def record_ok(self, ticket: Ticket) -> None:
        """Count a successful answer (called just before it is written)."""
        self.record(ticket, "ok")
