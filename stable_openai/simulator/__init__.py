"""A local OpenAI-compatible HTTP server for tests, demos and benchmarks (standard library only).

It speaks enough of the OpenAI wire for the real ``openai`` client to work unchanged: chat
completions (plain and streamed), embeddings and models; revoked keys, empty quotas, forbidden
regions and injected faults; and rate limits enforced the way OpenAI documents them — per
project and per model (families may share one limit), RPM/TPM beside RPD/TPD, continuously
refilling buckets by default (``fixed`` and ``sliding`` windows on request), rejected requests
counted against the per-minute limits — reported in the headers and 429 bodies of OpenAI, Azure,
a bare proxy, OpenRouter or Gemini (``SimulatorConfig.profile``)::

    from stable_openai.simulator import (
        ModelLimits, ProjectLimits, SimKey, Simulator, SimulatorConfig,
    )

    config = SimulatorConfig(
        keys=(SimKey("sk-test-a-0001", project="a"), SimKey("sk-test-b-0001", project="b")),
        projects={
            "a": ProjectLimits(rpm=3),
            "b": ProjectLimits(rpm=10, per_model=(ModelLimits(("gpt-4o",), rpm=2, rpd=50),)),
        },
        window=1.0,
    )
    with Simulator(config) as sim:
        client = openai.OpenAI(api_key="sk-test-a-0001", base_url=sim.base_url, max_retries=0)

Token accounting: a chat request costs ceil(chars of all message contents / 4) plus
``max_completion_tokens`` or ``max_tokens`` or 16; an embeddings request costs ceil(chars / 4).
"""

from ._config import (
    Faults,
    ModelLimits,
    ProjectLimits,
    SimKey,
    SimulatorConfig,
)
from ._server import Simulator
from ._wire import echo_answer

__all__ = [
    "Faults",
    "ModelLimits",
    "ProjectLimits",
    "SimKey",
    "Simulator",
    "SimulatorConfig",
    "echo_answer",
]
