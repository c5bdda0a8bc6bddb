"""``stable-openai simulate``: run the simulator in the foreground.

``add_arguments`` and ``run`` let the package CLI mount this as a subcommand; ``main`` is the
standalone entry (``python -m stable_openai.simulator._cli``). The listening line goes to stdout;
a masked summary of the keys goes to stderr. Whole keys are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Callable, TypeVar

from ._config import (
    DAY_WINDOWS,
    KEY_STATUSES,
    LIMIT_KINDS,
    LIMITERS,
    PROFILES,
    ModelLimits,
    ProjectLimits,
    SimKey,
    SimulatorConfig,
)
from ._server import Simulator
from ._wire import key_label

PROG = "stable-openai simulate"
_T = TypeVar("_T")


class ConfigError(Exception):
    """A problem with the command line or the config file (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    parser.add_argument(
        "--config",
        metavar="FILE.json",
        help="JSON file in SimulatorConfig.from_dict shape; flags below add to or override it",
    )
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="KEY[:PROJECT[:STATUS]]",
        help=f"an API key to accept (repeatable); STATUS is one of {', '.join(KEY_STATUSES)}",
    )
    for kind, what in (
        ("rpm", "requests per window"),
        ("tpm", "tokens per window"),
        ("rpd", f"requests per day ({DAY_WINDOWS} windows)"),
        ("tpd", f"tokens per day ({DAY_WINDOWS} windows)"),
    ):
        parser.add_argument(
            f"--{kind}", type=int, help=f"{what} for every project lacking limits"
        )
    parser.add_argument(
        "--model-limit",
        action="append",
        default=[],
        metavar="MODEL[,MODEL...]=KIND:N[,KIND:N...]",
        help="limits of a model, or of a family of models sharing one, in every project lacking "
        "limits (repeatable), e.g. gpt-4o=rpm:2,rpd:50",
    )
    parser.add_argument(
        "--window", type=float, help="the simulated minute, in seconds (default 60)"
    )
    parser.add_argument(
        "--limiter",
        choices=LIMITERS,
        help="how limits count: bucket (OpenAI's refilling buckets, the default), fixed or "
        "sliding windows",
    )
    parser.add_argument(
        "--count-rejected",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether a rejected request counts against the per-minute limits (default: yes)",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help="budget headers and 429 bodies of: openai (default), azure, bare (no "
        "x-ratelimit-*), openrouter or gemini",
    )
    parser.add_argument(
        "--retry-after",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether rate-limit 429s carry retry-after (default: yes)",
    )
    parser.add_argument("--latency", type=float, help="seconds of delay per admitted request")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free)")
    parser.add_argument("--fault-500", type=float, metavar="P", help="probability of a 500")
    parser.add_argument("--fault-503", type=float, metavar="P", help="probability of a 503")
    parser.add_argument(
        "--fault-drop", type=float, metavar="P", help="probability of closing without an answer"
    )
    parser.add_argument(
        "--fault-rate-limit", type=float, metavar="P", help="probability of a spurious 429"
    )
    parser.add_argument("--seed", type=int, help="RNG seed for faults")
    parser.add_argument(
        "--retry-after-ms",
        action="store_true",
        default=None,
        help="also send retry-after-ms on rate-limit 429s (as Azure does)",
    )


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser for ``main``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a local OpenAI-compatible server for tests and demos."
    )
    add_arguments(parser)
    return parser


def _parse_key(spec: str) -> SimKey:
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise ConfigError(
            f"--key {key_label(parts[0])}: expected KEY[:PROJECT[:STATUS]] with no empty parts"
        )
    fields = dict(zip(("key", "project", "status"), parts))
    try:
        return SimKey(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--key {key_label(parts[0])}: {exc}") from None


def _parse_model_limit(spec: str) -> ModelLimits:
    """``gpt-4o,gpt-4o-2024-08-06=rpm:2,rpd:50`` -> ModelLimits."""
    models, sep, limits = spec.partition("=")
    fields: dict[str, Any] = {"models": tuple(m.strip() for m in models.split(","))}
    try:
        if not sep or not limits.strip():
            raise ValueError("expected MODEL[,MODEL...]=KIND:N[,KIND:N...]")
        for item in limits.split(","):
            kind, colon, number = item.strip().partition(":")
            if not colon or kind not in LIMIT_KINDS:
                raise ValueError(
                    f"{item.strip()!r} is not KIND:N with KIND one of {', '.join(LIMIT_KINDS)}"
                )
            if kind in fields:
                raise ValueError(f"{kind} is given twice")
            fields[kind] = int(number)
        return ModelLimits(**fields)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--model-limit {spec!r}: {exc}") from None


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Combine ``--config`` and the flags into one validated ``SimulatorConfig``."""
    base = SimulatorConfig()
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read {args.config}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{args.config} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: the top level must be a JSON object")
        try:
            base = SimulatorConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{args.config}: {exc}") from None

    keys = list(base.keys) + [_parse_key(spec) for spec in args.key]
    if not keys:
        raise ConfigError("no keys configured: pass --key KEY or --config FILE.json")

    projects: dict[str, ProjectLimits] = dict(base.projects)
    limits = {kind: getattr(args, kind) for kind in LIMIT_KINDS if getattr(args, kind) is not None}
    per_model = tuple(_parse_model_limit(spec) for spec in args.model_limit)
    _build("--model-limit", ProjectLimits, per_model=per_model)  # a model named twice
    if limits or per_model:
        for project in {k.project for k in keys}:
            if project not in projects:
                projects[project] = _build(
                    "--rpm/--tpm/--rpd/--tpd", ProjectLimits, per_model=per_model, **limits
                )

    fault_changes = {
        name: value
        for name, value in (
            ("error_500", args.fault_500),
            ("error_503", args.fault_503),
            ("drop", args.fault_drop),
            ("rate_limit", args.fault_rate_limit),
        )
        if value is not None
    }
    faults = _build("--fault-*", dataclasses.replace, base.faults, **fault_changes)

    changes: dict[str, Any] = {"keys": tuple(keys), "projects": projects, "faults": faults}
    for name in (
        "window", "latency", "seed", "limiter", "count_rejected", "profile", "retry_after",
        "retry_after_ms",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    config: SimulatorConfig = _build("options", dataclasses.replace, base, **changes)
    return config


def _build(where: str, make: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``make``, turning a validation error into a ``ConfigError`` naming ``where``."""
    try:
        return make(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _install_handlers() -> dict[int, Any]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt; returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        signum: signal.signal(signum, _raise_interrupt)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM. Returns 0 on a clean stop, 2 on bad config, 1 on bind errors."""
    try:
        config = config_from_args(args)
        simulator = Simulator(config, host=args.host, port=args.port)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (TypeError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    try:
        simulator.start()
    except OSError as exc:
        print(f"{PROG}: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1

    # Ctrl-C and SIGTERM both end the loop below; install both explicitly, since a process
    # started in the background may inherit an ignored SIGINT.
    previous = _install_handlers()
    try:
        for sim_key in config.keys:
            project = config.limits(sim_key.project)
            shown = " ".join(f"{kind}={getattr(project, kind)}" for kind in LIMIT_KINDS)
            for group in project.per_model:
                shown += f" {','.join(group.models)}=" + ",".join(
                    f"{kind}:{getattr(group, kind)}"
                    for kind in LIMIT_KINDS
                    if getattr(group, kind) is not None
                )
            print(
                f"  key {key_label(sim_key.key)} project={sim_key.project} "
                f"organization={sim_key.organization} status={sim_key.status} {shown}",
                file=sys.stderr,
            )
        print(
            f"  limiter={config.limiter} count_rejected={config.count_rejected} "
            f"profile={config.profile} window={config.window:g}s",
            file=sys.stderr,
        )
        print(f"stable-openai simulator listening on {simulator.base_url}", flush=True)
        idle = threading.Event()
        while not idle.wait(1.0):  # sleeps in short steps so signals are handled promptly
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        simulator.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point."""
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
