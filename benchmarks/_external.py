"""Subprocess worker: one contender in a process of its own.

The original package and LiteLLM live in their own virtual environments (the original has our
import name); stable_openai's contenders run here too, under the project's python, so that no
contender shares a process (and a GIL) with the simulator.  Run by throughput.py as
``<python> _external.py`` with this protocol on the pipes:

1. stdin: one JSON line, the spec: ``kind`` ("original", "litellm" or "ours:<kind>" with a
   kind of _ours.KINDS), ``base_url``, ``keys``, ``warmup_key``, ``threads``, ``tasks``,
   ``sized``, ``grace``;
2. stdout: ``READY {json}`` once imported, set up and warmed up (one plain call on the
   warm-up key, so import time and lazy loading are not timed), with package versions;
3. stdin: ``GO {"start": t, "deadline": t}`` in wall-clock seconds;
4. stdout: ``RESULT {json}`` with the per-call records (see _harness), then ``os._exit``: the
   original package's key thread never ends, and stragglers must not keep the process alive.

Anything the libraries print goes to stderr; only these lines go to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO

import _harness

MODEL = "gpt-4o-mini"


def _versions(*names: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


Setup = tuple[_harness.Call, dict[str, Any]]


def _setup_original(spec: dict[str, Any]) -> Setup:
    """stable-openai 0.1.1 as its README shows it, with one client per key and no retries
    inside the client (as our contender 1 does)."""
    import openai

    import stable_openai
    from stable_openai import KeyManager, stable

    here = os.path.realpath(stable_openai.__file__)
    if not here.startswith(os.path.realpath(sys.prefix)):
        raise RuntimeError(f"stable_openai imported from outside the venv: {here}")
    base_url = spec["base_url"]
    warm = openai.OpenAI(api_key=spec["warmup_key"], base_url=base_url, max_retries=0)
    warm.chat.completions.create(model=MODEL, messages=_messages("warm up"))
    warm.close()

    KeyManager(spec["keys"])
    clients: dict[str, Any] = {}
    lock = threading.Lock()

    @stable
    def ask(text: str, max_tokens: int | None, api_key: str) -> Any:
        client = clients.get(api_key)
        if client is None:
            with lock:
                client = clients.setdefault(
                    api_key, openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0))
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        response = client.chat.completions.create(model=MODEL, messages=_messages(text), **extra)
        return response.choices[0].message.content

    return ask, {"versions": _versions("stable-openai", "openai", "backoff", "httpx", "httpx2")}


def _setup_litellm(spec: dict[str, Any]) -> Setup:
    """LiteLLM's Router, one deployment per key, three retries."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm  # type: ignore[import-not-found, unused-ignore]
    from litellm import Router  # type: ignore[import-not-found, unused-ignore]

    litellm.suppress_debug_info = True
    if hasattr(litellm, "telemetry"):
        litellm.telemetry = False
    base_url = spec["base_url"]
    litellm.completion(model=f"openai/{MODEL}", messages=_messages("warm up"),
                       api_key=spec["warmup_key"], api_base=base_url)
    router = Router(
        model_list=[
            {"model_name": MODEL,
             "litellm_params": {"model": f"openai/{MODEL}", "api_key": key,
                                "api_base": base_url}}
            for key in spec["keys"]
        ],
        num_retries=3,
    )

    def ask(text: str, max_tokens: int | None) -> Any:
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        response = router.completion(model=MODEL, messages=_messages(text), **extra)
        return response.choices[0].message.content

    return ask, {"versions": _versions("litellm", "openai", "httpx", "httpx2", "aiohttp")}


SETUPS = {"original": _setup_original, "litellm": _setup_litellm}


def _runner(spec: dict[str, Any]) -> tuple[Callable[[float, float], dict[str, Any]],
                                            dict[str, Any]]:
    """``run(start, deadline) -> result`` for the contender of ``spec``, and what to report."""
    kind: str = spec["kind"]
    if kind.startswith("ours:"):
        import _ours

        _ours.warm_up(spec["base_url"], spec["warmup_key"])
        run = _ours.build(kind[5:], spec["base_url"], spec["keys"])
        info = {"versions": _versions("stable-openai", "openai", "httpx2")}
        return (lambda start, deadline: run(start, deadline, spec["grace"], spec["sized"],
                                            spec["threads"], spec["tasks"])), info
    call, info = SETUPS[kind](spec)
    return (lambda start, deadline: _harness.run_threads(
        call, spec["threads"], start, deadline, spec["grace"], spec["sized"])), info


def _say(out: TextIO, tag: str, payload: dict[str, Any]) -> None:
    out.write(f"{tag} {json.dumps(payload, separators=(',', ':'))}\n")
    out.flush()


def main() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # whatever the libraries print stays off the protocol
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        spec = json.loads(sys.stdin.readline())
        run, info = _runner(spec)
        _say(out, "READY", info)
        line = sys.stdin.readline()
        if not line.startswith("GO "):
            raise RuntimeError(f"expected GO, got {line[:40]!r}")
        go = json.loads(line[3:])
        result = run(go["start"], go["deadline"])
        _say(out, "RESULT", result)
        code = 0
    except BaseException as exc:
        traceback.print_exc()
        _say(out, "ERROR", {"message": f"{type(exc).__name__}: {exc}"[:300]})
        code = 1
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
