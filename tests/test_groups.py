"""Several groups of keys in one process: the singleton beside ``KeyManager.create`` managers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
import pytest
from wire import made_up_keys

from stable_openai import AllKeysDisabledError, KeyManager, stable
from stable_openai.simulator import ProjectLimits, SimKey, Simulator, SimulatorConfig

MODEL = "gpt-4o-mini"
StartSimulator = Callable[[SimulatorConfig], Simulator]


def two_groups(start_simulator: StartSimulator) -> tuple[Simulator, list[str], list[str]]:
    """A simulator serving two groups of two keys each, every key in a project of its own."""
    openai_keys = made_up_keys(2, "group-openai")
    azure_keys = made_up_keys(2, "group-azure")
    sim_keys = [SimKey(k, project=f"p{i}") for i, k in enumerate(openai_keys + azure_keys)]
    sim = start_simulator(SimulatorConfig(
        keys=tuple(sim_keys), projects={k.project: ProjectLimits(rpm=1000) for k in sim_keys},
        window=1.0,
    ))
    return sim, openai_keys, azure_keys


def requests_by_key(sim: Simulator, keys: list[str]) -> list[int]:
    return [sim.key_stats(key)["requests"] for key in keys]


def test_a_created_manager_is_not_the_singleton_and_shares_nothing_with_it() -> None:
    first, second = made_up_keys(2, "group-a"), made_up_keys(3, "group-b")
    singleton = KeyManager(first)
    group = KeyManager.create(second)
    assert group is not singleton
    assert KeyManager() is singleton and KeyManager.current() is singleton
    assert KeyManager.create(second) is not group  # each create() is a new group
    assert sorted(group.data) == sorted(second) and sorted(singleton.data) == sorted(first)
    group.set_ttl(second[0], 60)
    assert singleton.get_min_ttl() == 0.0
    assert group.data[second[0]] > 59
    KeyManager.reset()  # forgets the singleton only
    assert len(group) == 3


def test_create_does_not_make_a_singleton_either() -> None:
    group = KeyManager.create(made_up_keys(1, "group-alone"))
    assert KeyManager.current() is None
    assert len(group) == 1


def test_a_group_whose_keys_were_all_deleted_is_still_the_group_its_function_uses() -> None:
    """An empty manager is falsy (len 0): it must not be taken for "no manager given" and
    swapped for the singleton."""
    from stable_openai import NoKeysError

    KeyManager(made_up_keys(2, "group-single"))
    (key,) = made_up_keys(1, "group-emptied")
    group = KeyManager.create([key])

    @stable(manager=group, max_wait=0.1)
    def which(api_key: str) -> str:
        return api_key

    assert which() == key
    assert group.delete_key(key) and len(group) == 0
    with pytest.raises(NoKeysError):
        which()


def test_create_validates_what_it_is_given() -> None:
    with pytest.raises(ValueError):
        KeyManager.create([])
    with pytest.raises(TypeError):
        KeyManager.create([42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="backend"):
        KeyManager.create(made_up_keys(1, "group-bad"), backend=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        KeyManager.create(made_up_keys(1, "group-bad"), clock=5)  # type: ignore[arg-type]


def test_each_decorated_function_uses_its_own_group(
    start_simulator: StartSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim, openai_keys, azure_keys = two_groups(start_simulator)
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    KeyManager(openai_keys)
    azure = KeyManager.create(azure_keys)

    @stable
    def ask(text: str, client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    @stable(manager=azure)
    def ask_azure(text: str, api_key: str) -> str:
        with openai.OpenAI(api_key=api_key, max_retries=0) as client:
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    @stable(manager=azure)
    async def ask_azure_async(text: str, client: openai.AsyncOpenAI) -> str:
        answer = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    try:
        assert [ask(f"o{i}") for i in range(6)] == [f"echo: o{i}" for i in range(6)]
        assert requests_by_key(sim, openai_keys) == [3, 3]
        assert requests_by_key(sim, azure_keys) == [0, 0]
        assert [ask_azure(f"a{i}") for i in range(4)] == [f"echo: a{i}" for i in range(4)]

        async def main() -> list[str]:
            try:
                return list(await asyncio.gather(*(ask_azure_async(f"b{i}") for i in range(4))))
            finally:
                await azure.aclose()

        assert asyncio.run(main()) == [f"echo: b{i}" for i in range(4)]
        assert requests_by_key(sim, openai_keys) == [3, 3]
        assert sum(requests_by_key(sim, azure_keys)) == 8
        assert sum(row["successes"] for row in azure.stats()) == 8
        assert sum(row["successes"] for row in KeyManager().stats()) == 6
    finally:
        azure.close()
        KeyManager().close()


def test_a_group_whose_keys_are_revoked_does_not_touch_the_other(
    start_simulator: StartSimulator,
) -> None:
    sim, openai_keys, azure_keys = two_groups(start_simulator)
    for key in azure_keys:
        sim.set_key_status(key, "revoked")
    KeyManager(openai_keys)
    azure = KeyManager.create(azure_keys)

    def make(manager: KeyManager | None) -> Callable[[str], str]:
        @stable(manager=manager)
        def ask(text: str, api_key: str) -> str:
            with openai.OpenAI(api_key=api_key, base_url=sim.base_url, max_retries=0) as c:
                answer = c.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": text}])
            return str(answer.choices[0].message.content)

        return ask

    with pytest.raises(AllKeysDisabledError):
        make(azure)("lost")
    assert make(None)("kept") == "echo: kept"
    assert all(row["state"] == "disabled" for row in azure.stats())
    assert all(row["state"] == "ready" for row in KeyManager().stats())
