"""The command line: ``python -m stable_openai {demo,check,simulate}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, _check, _demo
from .simulator import _cli as _simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-openai",
        description="Use several OpenAI API keys at once, safely.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="see key rotation work on the local simulator (no real key needed)",
        description=(
            "The library at work on the local simulator, no real key needed: several projects "
            "with tight limits, two keys sharing one project's budget, one revoked key and one "
            "out of quota, under OpenAI's strict rate limiting. It runs a concurrent workload "
            "through @stable with the real openai client, shows live progress and ends with a "
            "summary. Exit status 0 means every call got its own right answer."
        ),
    )
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.run)
    check = commands.add_parser(
        "check", help="check which of your keys are usable, and their limits",
        description=(
            "Is each of your keys usable, and what limits does it have? One tiny request per "
            "key (a one-token chat completion, or only a model list with --models-only) against "
            "the real API or any --base-url. One row per key, the key masked. Keys come from "
            "the arguments, --file, or OPENAI_API_KEYS."
        ),
    )
    _check.add_arguments(check)
    check.set_defaults(run=_check.run)
    simulate = commands.add_parser(
        "simulate", help="run the local OpenAI-compatible simulator in the foreground",
        description=(
            "Run the local OpenAI-compatible simulator in the foreground (for tests and demos): "
            "it prints the address it listens on, and a summary of the keys it accepts with "
            "every key masked. Stop it with Ctrl-C."
        ),
    )
    _simulate.add_arguments(simulate)
    simulate.set_defaults(run=_simulate.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
