"""Subprocess worker: one contender in one mode, in a process of its own.

The original package and LiteLLM live in their own virtual environments (the original has our
import name); stable_openai's contenders run here too, under the project's python, so that no
contender shares a process (and a GIL) with the simulator.  Run by throughput.py as
``<python> _external.py`` with this protocol on the pipes:

1. stdin: one JSON line, the spec: ``kind`` ("ours", "original" or "litellm"), ``mode`` (see
   MODES), ``base_url``, ``keys``, ``warmup_key``, ``workload`` (``[[model, workers], ...]``),
   ``grace``;
2. stdout: ``READY {json}`` once imported, set up and warmed up (one plain call on the
   warm-up key, so import time and lazy loading are not timed), with package versions;
3. stdin: ``GO {"start": t, "deadline": t}`` in wall-clock seconds;
4. stdout: ``RESULT {json}`` with the per-call records (see _harness), then ``os._exit``: the
   original package's key thread never ends, and stragglers must not keep the process alive.

Anything the libraries print goes to stderr; only these lines go to stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, TextIO

import _harness


def _messages(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


MODES = {
    "ours": ("per_call", "per_key", "pooled", "async"),
    "original": ("per_call", "per_key"),
    "litellm": ("pooled", "async"),
}
"""The modes each contender can run; the others are n/a for it (see throughput.py)."""

Runner = Callable[[float, float], dict[str, Any]]


def _setup_original(spec: dict[str, Any]) -> Runner:
    """stable-openai 0.1.1 as its README shows it: ``per_call`` builds ``OpenAI(api_key=...)``
    on every call (default retries), ``per_key`` keeps one ``max_retries=0`` client per key."""
    import openai

    import stable_openai
    from stable_openai import KeyManager, stable

    here = os.path.realpath(stable_openai.__file__)
    if not here.startswith(os.path.realpath(sys.prefix)):
        raise RuntimeError(f"stable_openai imported from outside the venv: {here}")
    os.environ["OPENAI_BASE_URL"] = spec["base_url"]
    model = spec["workload"][0][0]
    warm = openai.OpenAI(api_key=spec["warmup_key"], max_retries=0)
    warm.chat.completions.create(model=model, messages=_messages("warm up"))
    warm.close()

    KeyManager(spec["keys"])
    clients: dict[str, Any] = {}
    lock = threading.Lock()

    def client_for(api_key: str) -> Any:
        if spec["mode"] == "per_call":
            return openai.OpenAI(api_key=api_key)
        with lock:
            client = clients.get(api_key)
            if client is None:
                client = clients[api_key] = openai.OpenAI(api_key=api_key, max_retries=0)
            return client

    @stable
    def ask(model: str, text: str, max_tokens: int | None, api_key: str) -> Any:
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        response = client_for(api_key).chat.completions.create(
            model=model, messages=_messages(text), **extra)
        return response.choices[0].message.content

    return lambda start, deadline: _harness.run_threads(
        ask, _workload(spec), start, deadline, spec["grace"])


def _setup_litellm(spec: dict[str, Any]) -> Runner:
    """LiteLLM's Router, one deployment per key and model, three retries: ``pooled`` calls
    ``router.completion`` from threads, ``async`` ``router.acompletion`` from coroutines."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import asyncio

    import litellm  # type: ignore[import-not-found, unused-ignore]
    from litellm import Router  # type: ignore[import-not-found, unused-ignore]

    litellm.suppress_debug_info = True
    if hasattr(litellm, "telemetry"):
        litellm.telemetry = False
    base_url = spec["base_url"]
    workload = _workload(spec)
    litellm.completion(model=f"openai/{workload[0][0]}", messages=_messages("warm up"),
                       api_key=spec["warmup_key"], api_base=base_url)
    router = Router(
        model_list=[
            {"model_name": model,
             "litellm_params": {"model": f"openai/{model}", "api_key": key,
                                "api_base": base_url}}
            for model, _ in workload for key in spec["keys"]
        ],
        num_retries=3,
    )

    def ask(model: str, text: str, max_tokens: int | None) -> Any:
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        response = router.completion(model=model, messages=_messages(text), **extra)
        return response.choices[0].message.content

    async def ask_async(model: str, text: str, max_tokens: int | None) -> Any:
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        response = await router.acompletion(model=model, messages=_messages(text), **extra)
        return response.choices[0].message.content

    if spec["mode"] == "async":
        return lambda start, deadline: asyncio.run(_harness.run_coroutines(
            ask_async, workload, start, deadline, spec["grace"]))
    return lambda start, deadline: _harness.run_threads(
        ask, workload, start, deadline, spec["grace"])


def _setup_ours(spec: dict[str, Any]) -> Runner:
    import _ours

    _ours.warm_up(spec["base_url"], spec["warmup_key"], spec["workload"][0][0])
    run = _ours.build(spec["mode"], spec["base_url"], spec["keys"])
    return lambda start, deadline: run(start, deadline, spec["grace"], _workload(spec))


def _workload(spec: dict[str, Any]) -> _harness.Workload:
    return [(str(model), int(workers)) for model, workers in spec["workload"]]


SETUPS = {"ours": _setup_ours, "original": _setup_original, "litellm": _setup_litellm}
VERSIONS = {
    "ours": ("stable-openai", "openai", "httpx", "httpx2"),
    "original": ("stable-openai", "openai", "backoff", "httpx", "httpx2"),
    "litellm": ("litellm", "openai", "httpx", "httpx2", "aiohttp"),
}


def _runner(spec: dict[str, Any]) -> tuple[Runner, dict[str, Any]]:
    """``run(start, deadline) -> result`` for the contender of ``spec``, and what to report."""
    kind: str = spec["kind"]
    if spec["mode"] not in MODES[kind]:
        raise ValueError(f"{kind} has no mode {spec['mode']!r}")
    return SETUPS[kind](spec), {"versions": _harness.versions(*VERSIONS[kind])}


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
