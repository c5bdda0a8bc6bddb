"""The simulator's shared state: configuration, per-project windows, fault RNG and counters.

One lock guards all of it. Callers hold it only for bookkeeping: never while sleeping or writing
to a socket. The HTTP layer asks for a ``Verdict`` and then does the slow parts outside the lock.

Limits use fixed windows per project: window index = floor((now - start) / window). A request is
admitted if the project's requests and tokens for the current window stay within ``rpm`` and
``tpm``; rejected requests do not use budget. Token cost is computed by the caller (see
``_wire.chat_request_cost``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import _wire
from ._config import KEY_STATUSES, ProjectLimits, SimKey, SimulatorConfig

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
class _Window:
    """Usage of one project in one fixed window."""

    index: int = -1
    requests: int = 0
    tokens: int = 0


@dataclass
class Ticket:
    """One request in progress, from ``begin`` to ``end``."""

    request_id: str
    started: float
    sim_key: SimKey | None
    label: str | None
    outcome: str | None = None


@dataclass(frozen=True)
class Verdict:
    """What to do with a request: answer normally (``status`` 200) or with an error body.

    ``delay`` is slept (outside the lock) before answering; ``drop`` closes the connection
    without an answer; ``headers`` go on the answer whatever it is.
    """

    status: int
    body: dict[str, Any] | None = None
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
        self._windows: dict[str, _Window] = {}
        self._totals = _Counters(KEY_FIELDS)
        self._labels: dict[str, str] = {}
        self._key_counters: dict[str, _Counters] = {}
        self._project_counters: dict[str, _Counters] = {}
        self._by_key: dict[str, SimKey] = {}
        self._register(config)

    # ----------------------------------------------------------------- configuration

    @property
    def config(self) -> SimulatorConfig:
        return self._config

    def configure(self, config: SimulatorConfig) -> None:
        """Replace the configuration; counters and current windows are kept.

        The fault RNG is reseeded from ``config.seed``; if the window length changes, all
        windows restart now.
        """
        with self._lock:
            if config.window != self._config.window:
                self._windows.clear()
                self._start = self._clock()
            self._config = config
            self._rng = random.Random(config.seed)
            self._register(config)

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

    def admit(self, ticket: Ticket, model: str, cost: int, budgeted: bool = True) -> Verdict:
        """Apply the project's limits and draw faults for a request whose key passed.

        ``cost`` is the request's token cost; ``budgeted=False`` (e.g. listing models) skips
        the limits. Admitted requests use budget even if a fault then fails them, like a real
        server that did the work.
        """
        with self._lock:
            config = self._config
            sim_key = ticket.sim_key
            assert sim_key is not None, "admit() needs a key that passed check_key()"
            org = sim_key.organization
            limits = config.limits(sim_key.project)
            window = self._window(sim_key.project)
            to_end = self._time_to_window_end(window)
            headers = list(self.identity_headers(ticket))

            if budgeted:
                if limits.tpm is not None and cost > limits.tpm:
                    self._record(ticket, "too_large")
                    body = _wire.too_large_body(model, org, limits.tpm, cost)
                    return Verdict(429, body, tuple(headers + self._limit_headers(window, limits)))
                over: str | None = None
                if limits.rpm is not None and window.requests + 1 > limits.rpm:
                    over = "requests"
                    limit, used, requested = limits.rpm, window.requests, 1
                elif limits.tpm is not None and window.tokens + cost > limits.tpm:
                    over = "tokens"
                    limit, used, requested = limits.tpm, window.tokens, cost
                if over is not None:
                    self._record(ticket, "rate_limited")
                    body = _wire.rate_limit_body(model, org, over, limit, used, requested, to_end)
                    headers += self._retry_headers(to_end, config.retry_after_ms)
                    return Verdict(429, body, tuple(headers + self._limit_headers(window, limits)))
                window.requests += 1
                window.tokens += cost
                project = self._project_scope(ticket)
                if project is not None:
                    project.add("tokens", cost)
            headers += self._limit_headers(window, limits)
            return self._draw_faults(ticket, model, org, limits.rpm, window, headers)

    def _draw_faults(
        self,
        ticket: Ticket,
        model: str,
        org: str,
        rpm: int | None,
        window: _Window,
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
            self._record(ticket, "faults")
            used = window.requests
            body = _wire.rate_limit_body(
                model, org, "requests", rpm if rpm is not None else used, used, 1, 1.0
            )
            headers += self._retry_headers(1.0, config.retry_after_ms)
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

    # ----------------------------------------------------------------- windows

    def _window(self, project: str) -> _Window:
        index = math.floor((self._clock() - self._start) / self._config.window)
        window = self._windows.get(project)
        if window is None or window.index != index:
            window = _Window(index)
            self._windows[project] = window
        return window

    def _time_to_window_end(self, window: _Window) -> float:
        end = self._start + (window.index + 1) * self._config.window
        return max(0.0, end - self._clock())

    def _limit_headers(self, window: _Window, limits: ProjectLimits) -> list[tuple[str, str]]:
        """``x-ratelimit-*`` headers for the limits that are set (remainders after this request).

        Resets are the time until the window ends, or ``0s`` when nothing of it is used.
        """
        out: list[tuple[str, str]] = []
        to_end = self._time_to_window_end(window)
        for kind, limit, used in (
            ("requests", limits.rpm, window.requests),
            ("tokens", limits.tpm, window.tokens),
        ):
            if limit is None:
                continue
            out.append((f"x-ratelimit-limit-{kind}", str(limit)))
            out.append((f"x-ratelimit-remaining-{kind}", str(max(0, limit - used))))
            out.append((f"x-ratelimit-reset-{kind}", _wire.go_duration(to_end if used else 0.0)))
        return out

    @staticmethod
    def _retry_headers(seconds: float, with_ms: bool) -> list[tuple[str, str]]:
        out = [("retry-after", str(_wire.retry_after_seconds(seconds)))]
        if with_ms:
            out.append(("retry-after-ms", str(_wire.retry_after_ms(seconds))))
        return out
