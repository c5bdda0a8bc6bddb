"""The process around the library: exit, fork, import."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EXITS = textwrap.dedent(
    """
    import threading
    from stable_openai import KeyManager, stable

    KeyManager(["sk-exit-0000-MADEUP000000000001", "sk-exit-0001-MADEUP000000000002"])
    KeyManager().set_ttl("sk-exit-0000-MADEUP000000000001", 3600)

    @stable
    def ask(api_key):
        return api_key[-1]

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", ask(), threading.active_count())
    """
)

FORKS = textwrap.dedent(
    """
    import os, threading, time
    from stable_openai import KeyManager, stable

    keys = [f"sk-fork-{i:04d}-MADEUP00000000000{i}" for i in range(4)]
    manager = MAKE(keys)
    started = threading.Event()

    @stable(manager=manager)
    def ask(api_key, hold=0.0, model="gpt-4o"):  # (a model: its calls are counted)
        started.set()
        time.sleep(hold)
        return api_key

    # a call is in flight in another thread (holding a key) when we fork
    busy = threading.Thread(target=ask, kwargs={"hold": 0.5})
    busy.start()
    started.wait()
    pid = os.fork()
    if pid == 0:
        ok = all(ask() in keys for _ in range(20))
        flights = sum(row["in_flight"] for row in manager.stats())
        os._exit(0 if ok and flights == 0 and not manager._spread_calls else 3)
    _, status = os.waitpid(pid, 0)
    busy.join()
    print("child", os.waitstatus_to_exitcode(status), "parent", ask() in keys)
    """
)
"""A fork while a call holds a key; MAKE builds the manager (the singleton, or a group)."""


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_program_that_builds_a_key_manager_exits_when_its_work_is_done() -> None:
    done = run(EXITS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["done", "2", "1"]  # only the main thread is left


@pytest.mark.parametrize("make", ["KeyManager", "KeyManager.create"])
def test_a_forked_child_gets_a_working_lock_and_a_consistent_ring(make: str) -> None:
    done = run(FORKS.replace("MAKE", make))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["child", "0", "parent", "True"]


FORK_WHILE_BUILDING = textwrap.dedent(
    """
    import os, threading
    import openai
    from stable_openai import Key, KeyManager, stable
    from stable_openai import _clients
    from stable_openai.simulator import SimKey, Simulator, SimulatorConfig

    key = "sk-fork-build-MADEUP0000000001"
    with Simulator(SimulatorConfig(keys=(SimKey(key),))) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])

        @stable
        def ask(client):
            return client.models.list().data[0].id

        # Another thread is building a pooled client (holds the lock) when we fork.
        holding, release = threading.Event(), threading.Event()

        def builder():
            with _clients._building:
                holding.set()
                release.wait()

        thread = threading.Thread(target=builder)
        thread.start()
        holding.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if ask() else 3)
        release.set()
        thread.join()
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), "parent", bool(ask()))
    """
)


def test_a_child_forked_while_a_pooled_client_is_being_built_can_build_its_own() -> None:
    done = run(FORK_WHILE_BUILDING)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["child", "0", "parent", "True"]
