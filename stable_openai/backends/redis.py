"""Key state shared by every process and host, in Redis (or Valkey).

``KeyManager(keys, backend="redis://host:6379/0")``.  Redis holds, per namespace, what every
worker must agree on: cooldown deadlines, disabled keys and why, calls in flight (as leases
that expire, so a crashed worker leaks nothing), learned budgets and pools, client-side
pacing, and the counters ``stats()`` shows.  A call costs two round trips: one script
chooses a key and marks it in flight; another reports how the call ended.  Time is the
server's, so the hosts' clocks do not matter.  The scripts are package data
(``backends/lua/``), sent once per server and run by their SHA1 after.

Keys are known to Redis only by a keyed fingerprint (HMAC-SHA256 under the namespace, or a
secret you give); nothing is ever stored that contains a key.  Everything expires after a
day unused.

When Redis is down, slow or restarted, no call fails: the backend logs one WARNING, the
manager carries on with its in-process ring, and Redis is tried again (at the next call after
a backoff that doubles up to ``retry_max``); once it answers, the keys are registered again,
with what this process learned meanwhile, and one INFO says that sharing resumed.

The manager calls this backend outside its lock.  Threads share one redis-py client;
coroutines use one ``redis.asyncio`` client per event loop, closed when the loop shuts down its
async generators (as ``asyncio.run`` does), and report without blocking the loop.  Each client
has a pool of at most 32 connections that callers take turns on.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Generator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._budget import ServerBudget
from .._policy import Fate, Verdict
from .._ring import KeyRing, KeyState, Where
from ._base import Outcome, Pick, SharedKeyState, StorageError

if TYPE_CHECKING:
    import redis as redis_sync
    import redis.asyncio as redis_async

    _Request = tuple["_Script", list[str]]
    _Flow = Generator[_Request, Any, "_T"]

__all__ = ["INSTALL_HINT", "RedisBackend"]

logger = logging.getLogger("stable_openai")

INSTALL_HINT = 'the Redis backend needs redis-py: pip install "stable-openai[redis]"'
SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")

_T = TypeVar("_T")

#: Seconds between two registrations of the same keys, at most: each refreshes the expiry of
#: everything they use in Redis.
_REFRESH = 600.0
#: Connections to Redis per client (one sync client, one per event loop), at most.
_CONNECTIONS = 32
#: A cooldown longer than this is stored as this (Lua cannot read "inf").
_FOREVER = 1e9


@dataclass(frozen=True)
class _Script:
    name: str
    text: str
    sha: str


@functools.cache
def _script(name: str) -> _Script:
    """A script of ``backends/lua/``, after the functions every script shares."""
    folder = resources.files(__package__ or "stable_openai.backends").joinpath("lua")
    text = (
        folder.joinpath("common.lua").read_text("utf-8")
        + "\n"
        + folder.joinpath(f"{name}.lua").read_text("utf-8")
    )
    return _Script(name, text, hashlib.sha1(text.encode()).hexdigest())


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return redis


def _safe_url(url: str) -> str:
    """``url`` without its password, for logs and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL redis-py gets (``valkey`` schemes spelled ``redis``) and our own options."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"not a Redis URL (scheme {scheme!r}): use redis://host:6379/0, rediss://... "
            "(TLS), unix:///path/to/redis.sock, or valkey://..."
        )
    ours: dict[str, str] = {}
    theirs = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "namespace":
            ours[name] = value
        else:
            theirs.append((name, value))
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(scheme, scheme)
    return urlunsplit(parts._replace(scheme=scheme, query=urlencode(theirs))), ours


def _number(name: str, value: object, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RedisBackend({name}=...) must be a number of seconds")
    if not (math.isfinite(value) and value > low):
        raise ValueError(f"RedisBackend({name}=...) must be above {low}")
    return float(value)


def _text(value: float | int | None) -> str:
    """A number as an argument of a script ('' for none)."""
    if value is None:
        return ""
    return repr(min(float(value), _FOREVER)) if isinstance(value, float) else str(value)


class _Pending:
    """What an answer on a key said, and what its requests cost, for the call's report."""

    __slots__ = ("budget", "lease", "tokens")

    def __init__(self, lease: str = "") -> None:
        self.lease = lease
        self.budget: ServerBudget | None = None
        self.tokens = 0.0


#: The calls this thread or task has in flight, by key.  A report must carry its own call's
#: lease and answer: the budget an answer tells is placed by when that call was chosen.  (The
#: pooled client's hooks run in the thread or task of the call; a call's choice and report
#: too.)  Never mutated: each change sets a new mapping, so tasks never share one.
_CALLS: contextvars.ContextVar[Mapping[KeyState, _Pending] | None] = contextvars.ContextVar(
    "stable_openai_redis_calls", default=None
)


class _LoopClient:
    """The ``redis.asyncio`` client of one event loop, and the reports it is sending."""

    __slots__ = ("client", "closer", "reports")

    def __init__(self, client: redis_async.Redis) -> None:
        self.client = client
        self.closer: AsyncIterator[None] | None = None
        self.reports: set[asyncio.Task[None]] = set()


async def _close_with_loop(
    client: redis_async.Redis, forget: Callable[[], object]
) -> AsyncIterator[None]:
    """An async generator that the loop finalizes when it shuts down (``asyncio.run`` does):
    it closes the loop's client then, while the loop can still run it."""
    try:
        yield
    finally:
        forget()
        with contextlib.suppress(Exception):
            await client.aclose()


class RedisBackend:
    """Key state shared through Redis; see the module docstring.

    :param url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS,
        ``unix:///path.sock``, or the same with ``valkey``; ``?namespace=name`` may be given
        here.  Other query options go to redis-py.
    :param namespace: the prefix of every Redis key: applications with their own namespace
        share one Redis without seeing each other's keys.
    :param secret: the HMAC key of the fingerprints (default: the namespace).  Give one to
        make fingerprints useless to anyone who can read Redis but not your configuration.
    :param lease_seconds: a call not reported after this long is no longer counted in flight
        (its worker died).  Longer than your longest call or stream.
    :param idle_ttl: seconds after which unused state expires.
    :param timeout: socket timeout of every Redis command; slower counts as down.
    :param retry_first: seconds before Redis is tried again after it failed; doubles up to
        ``retry_max``.
    """

    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str | None = None,
        secret: str | bytes | None = None,
        lease_seconds: float = 60.0,
        idle_ttl: float = 86400.0,
        timeout: float = 0.25,
        retry_first: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"RedisBackend(url=...) must be a str, not {type(url).__name__}")
        redis_url, ours = _split_url(url)
        namespace = namespace if namespace is not None else ours.get("namespace", "stable_openai")
        if not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace):
            raise ValueError("RedisBackend namespace must be a non-empty string without spaces")
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise TypeError("RedisBackend(secret=...) must be str, bytes or None")
        if secret is not None and not secret:
            raise ValueError("RedisBackend(secret=...) must not be empty")
        self.namespace = namespace
        hmac_key = namespace if secret is None else secret
        self._secret = hmac_key.encode() if isinstance(hmac_key, str) else hmac_key
        self._lease = _number("lease_seconds", lease_seconds, 0)
        ttl = max(1, int(_number("idle_ttl", idle_ttl, 0)))
        self._ttl = str(ttl)
        self._refresh = min(_REFRESH, ttl / 4)
        self._timeout = _number("timeout", timeout, 0)
        self._retry_first = _number("retry_first", retry_first, 0)
        self._retry_max = max(self._retry_first, _number("retry_max", retry_max, 0))
        redis = _import_redis()
        self._redis = redis
        self._url = redis_url
        self.url = _safe_url(url)
        self._client: redis_sync.Redis = self._new_client(redis)
        self._scripts = {name: _script(name) for name in ("register", "choose", "report",
                                                          "control")}
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = (
            weakref.WeakKeyDictionary()
        )
        self._ring: KeyRing | None = None
        self._fps: dict[KeyState, str] = {}
        self._by_fp: dict[str, KeyState] = {}
        self._fingerprints: dict[str, str] = {}
        self._ring_id = ""
        self._generation = 0  # bumped when the keys change or Redis failed: register again
        self._registered = (-1, 0.0)  # (generation, monotonic time) of the last registration
        self._merge = False  # register with what this process learned while Redis was down
        self._leases: dict[KeyState, list[str]] = {}
        self._pending: dict[KeyState, _Pending] = {}
        self._down_until = 0.0  # monotonic; 0.0 while Redis answers
        self._retry_in = 0.0
        self._epoch = 0  # bumped when Redis is found down, or up again

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, namespace={self.namespace!r})"

    def _new_client(self, module: Any) -> Any:
        """A client of ``module`` (redis or redis.asyncio) on a pool of a few connections: many
        threads or coroutines take turns on them (a connection each would be too many)."""
        pool = module.BlockingConnectionPool.from_url(
            self._url,
            max_connections=_CONNECTIONS,
            timeout=max(1.0, 4 * self._timeout),  # waiting this long for one: Redis is down
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            retry=module.retry.Retry(self._redis.backoff.NoBackoff(), 0),  # we fall back instead
            decode_responses=True,
        )
        return module.Redis.from_pool(pool)

    # -- identity ----------------------------------------------------------------------------
    def fingerprint(self, key: str) -> str:
        """The keyed fingerprint Redis knows ``key`` by: HMAC-SHA256, 128 bits in hex."""
        fp = self._fingerprints.get(key)
        if fp is None:
            fp = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:32]
            self._fingerprints[key] = fp
        return fp

    def bind(self, ring: KeyRing) -> None:
        states = list(ring)
        fps = {state: self.fingerprint(state.key) for state in states}
        self._ring = ring
        self._fps = fps
        self._by_fp = {fp: state for state, fp in fps.items()}
        digest = hashlib.sha256("\n".join(sorted(fps.values())).encode()).hexdigest()
        self._ring_id = digest[:16]
        with self._lock:
            self._generation += 1
            for gone in [state for state in self._leases if state not in fps]:
                del self._leases[gone]

    # -- health ------------------------------------------------------------------------------
    def available(self) -> bool:
        down_until = self._down_until
        return not down_until or time.monotonic() >= down_until

    def _broken(self, exc: BaseException, epoch: int) -> None:
        """A flow begun in ``epoch`` failed.  Failures of flows begun before Redis was last
        found down or up again tell nothing new."""
        cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ else exc
        why = f"{type(cause).__name__}: {cause}"
        with self._lock:
            stale = epoch != self._epoch
            first = not self._down_until
            if not stale:
                self._epoch += 1
                self._retry_in = min(self._retry_max, 2 * self._retry_in or self._retry_first)
                self._down_until = time.monotonic() + self._retry_in
                self._generation += 1
                self._merge = True
            retry_in = self._retry_in
        if stale:
            logger.debug("Redis backend %s: a call begun earlier failed (%s)", self.url, why)
        elif first:
            logger.warning(
                "Redis backend %s failed (%s): carrying on with this process's own key "
                "state; trying Redis again in %.3gs", self.url, why, retry_in,
            )
        else:
            logger.debug("Redis backend %s still failing (%s); next try in %.3gs",
                         self.url, why, retry_in)

    def _healthy(self, epoch: int) -> None:
        """A flow begun in ``epoch`` succeeded: if Redis was down then, it is back."""
        if not self._down_until:
            return
        with self._lock:
            was_down = bool(self._down_until) and epoch == self._epoch
            if was_down:
                self._epoch += 1
                self._down_until = 0.0
                self._retry_in = 0.0
        if was_down:
            logger.info("Redis backend %s answers again: key state is shared again", self.url)

    # -- drivers: run a flow of script calls, sync or async ----------------------------------
    def _eval_error(self, script: _Script, exc: Exception) -> StorageError:
        return StorageError(f"Redis script {script.name} failed: {type(exc).__name__}")

    def _run(self, flow: _Flow[_T]) -> _T | None:
        """Run ``flow`` on the sync client; ``None`` (and Redis left alone a while) on failure."""
        client = self._client
        no_script = self._redis.exceptions.NoScriptError
        epoch = self._epoch
        try:
            request = next(flow)
            while True:
                script, args = request
                try:
                    try:
                        reply = client.evalsha(script.sha, 0, *args)
                    except no_script:
                        client.script_load(script.text)
                        reply = client.evalsha(script.sha, 0, *args)
                except self._redis.exceptions.RedisError as exc:
                    raise self._eval_error(script, exc) from exc
                request = flow.send(reply)
        except StopIteration as stop:
            self._healthy(epoch)
            result: _T = stop.value
            return result
        except Exception as exc:  # whatever failed, the call must not
            self._broken(exc, epoch)
            return None

    async def _run_async(self, flow: _Flow[_T], loop_client: _LoopClient) -> _T | None:
        """:meth:`_run` on the event loop's ``redis.asyncio`` client."""
        client = loop_client.client
        no_script = self._redis.exceptions.NoScriptError
        epoch = self._epoch
        try:
            if loop_client.closer is None:
                loop_ref = weakref.ref(asyncio.get_running_loop())
                loop_client.closer = _close_with_loop(client, lambda: self._forget_loop(loop_ref))
                await loop_client.closer.__anext__()
            request = next(flow)
            while True:
                script, args = request
                try:
                    try:
                        reply = await client.evalsha(script.sha, 0, *args)
                    except no_script:
                        await client.script_load(script.text)
                        reply = await client.evalsha(script.sha, 0, *args)
                except self._redis.exceptions.RedisError as exc:
                    raise self._eval_error(script, exc) from exc
                request = flow.send(reply)
        except StopIteration as stop:
            self._healthy(epoch)
            result: _T = stop.value
            return result
        except Exception as exc:
            self._broken(exc, epoch)
            return None

    def _loop_client(self, loop: asyncio.AbstractEventLoop) -> _LoopClient:
        with self._lock:
            loop_client = self._loops.get(loop)
            if loop_client is None:
                client = self._new_client(self._redis.asyncio)
                loop_client = self._loops[loop] = _LoopClient(client)
            return loop_client

    def _forget_loop(self, loop_ref: weakref.ref[asyncio.AbstractEventLoop]) -> None:
        loop = loop_ref()
        if loop is not None:
            with self._lock:
                self._loops.pop(loop, None)

    # -- flows: the script calls of each operation, whoever runs them ------------------------
    def _head(self) -> list[str]:
        return [self.namespace, self._ttl]

    def _register(self) -> _Flow[None]:
        """Register the keys if they changed, Redis failed since, or it is time to refresh."""
        generation, when = self._registered
        if generation == self._generation and time.monotonic() - when < self._refresh:
            return
        generation = self._generation
        merge = self._merge
        ring = self._ring
        args = [*self._head(), self._ring_id]
        for state, fp in list(self._fps.items()):
            spec = state.spec
            disabled = cooling = reason = ""
            if merge and state.where is Where.DISABLED:
                disabled = state.reason or "disabled"
            elif merge and state.where is Where.COOLING and ring is not None and not (
                state.cause is not None and state.cause.local_budget  # this process's view only
            ):
                left = state.cool_until - ring.clock()
                if left > 0:
                    cooling, reason = _text(left), state.reason
            args += [fp, _text(state.weight), spec.pool or "", _text(spec.rpm), _text(spec.tpm),
                     disabled, cooling, reason]
        yield self._scripts["register"], args
        self._registered = (generation, time.monotonic())
        if merge:
            self._merge = False

    def _choose(self, avoid: Collection[KeyState] | None) -> _Flow[Pick]:
        for _attempt in (1, 2):
            yield from self._register()
            fps = self._fps
            args = [*self._head(), self._ring_id, _text(self._lease)]
            if avoid:
                args += [fps[state] for state in avoid if state in fps]
            reply = yield self._scripts["choose"], args
            if int(reply[0]) != -1:
                return self._pick(reply)
            self._registered = (-1, 0.0)  # unknown to Redis: restarted, flushed or expired
        raise StorageError("Redis forgot the keys as soon as they were registered")

    def _pick(self, reply: list[Any]) -> Pick:
        if int(reply[0]) == 1:
            state = self._by_fp.get(reply[1])
            if state is None:  # a key this process let go of meanwhile: its lease expires
                return Pick(None, 0.0)
            with self._lock:
                self._leases.setdefault(state, []).append(reply[2])
            _CALLS.set({**(_CALLS.get() or {}), state: _Pending(reply[2])})
            return Pick(state)
        wait = float(reply[1])
        why = json.loads(reply[2])

        def counts(name: str) -> dict[str, int]:
            table = why.get(name)
            return {str(k): int(v) for k, v in table.items()} if isinstance(table, dict) else {}

        return Pick(
            None, None if wait < 0 else wait, counts("cooling"), counts("disabled"),
            bool(why.get("forbidden")),
        )

    def _report(self, args: list[str]) -> _Flow[bool]:
        for _attempt in (1, 2):
            yield from self._register()
            reply = yield self._scripts["report"], [*self._head(), *args]
            if int(reply[0]) != -1:
                return int(reply[0]) == 1
            self._registered = (-1, 0.0)
        return False

    def _control(self, *args: str) -> _Flow[Any]:
        yield from self._register()
        reply = yield self._scripts["control"], [*self._head(), *args]
        return reply

    # -- the protocol ------------------------------------------------------------------------
    def choose(self, avoid: Collection[KeyState] | None) -> Pick | None:
        return self._run(self._choose(avoid))

    async def choose_async(self, avoid: Collection[KeyState] | None) -> Pick | None:
        loop_client = self._loop_client(asyncio.get_running_loop())
        if loop_client.reports:  # this loop's reports first: a choice must see them
            await asyncio.wait(list(loop_client.reports))
        return await self._run_async(self._choose(avoid), loop_client)

    def observe(
        self, state: KeyState, budget: ServerBudget | None = None, tokens: float = 0.0
    ) -> None:
        if budget is None and not tokens:
            return
        calls = _CALLS.get()
        call = calls.get(state) if calls else None
        if call is not None:
            if budget is not None:
                call.budget = budget
            call.tokens += tokens
            return
        with self._lock:  # not from the call's own thread or task: the key's next report
            pending = self._pending.get(state)
            if pending is None:
                pending = self._pending[state] = _Pending()
            if budget is not None:
                pending.budget = budget
            pending.tokens += tokens

    def report(
        self,
        state: KeyState,
        outcome: Outcome,
        verdict: Verdict | None = None,
        organization: str | None = None,
    ) -> None:
        fp = self._fps.get(state)
        calls = _CALLS.get() or {}
        call = calls.get(state)
        if call is not None:
            _CALLS.set({key: value for key, value in calls.items() if key is not state})
        with self._lock:
            leases = self._leases.get(state) or []
            if call is not None and call.lease in leases:
                leases.remove(call.lease)
                lease = call.lease
            else:  # chosen in another thread or task: any of the key's calls will do
                lease = leases.pop(0) if leases else ""
            pending = self._pending.pop(state, None)
        if fp is None or not self.available():
            return
        fate, seconds, reason, forbidden = "keep", 0.0, "", "0"
        if verdict is not None and verdict.fate is Fate.COOL:
            fate = "cool_pool" if verdict.pooled else "cool"
            seconds, reason = verdict.seconds, verdict.reason
            forbidden = "1" if verdict.forbidden else "0"
        elif verdict is not None and verdict.fate is Fate.DISABLE:
            fate, reason = "disable", verdict.reason
        budget = call.budget if call is not None else None
        if budget is None and pending is not None:
            budget = pending.budget
        join, mode = organization or "", "own"
        if budget is not None and budget.organization:
            join, mode = budget.organization, "any"
            if budget.project:
                join = f"{join}/{budget.project}"
        args = [fp, lease, outcome, fate, _text(seconds), reason, forbidden, join, mode]
        if budget is not None:
            args += [_text(budget.requests_limit), _text(budget.requests_left),
                     _text(budget.requests_reset), _text(budget.tokens_limit),
                     _text(budget.tokens_left), _text(budget.tokens_reset)]
        else:
            args += [""] * 6
        tokens = (call.tokens if call is not None else 0.0) + (
            pending.tokens if pending is not None else 0.0
        )
        args.append(_text(tokens))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._run(self._report(args))
            return
        loop_client = self._loop_client(loop)
        task = loop.create_task(self._report_async(args, loop_client))
        loop_client.reports.add(task)
        task.add_done_callback(loop_client.reports.discard)

    async def _report_async(self, args: list[str], loop_client: _LoopClient) -> None:
        try:
            await self._run_async(self._report(args), loop_client)
        except asyncio.CancelledError:  # the loop is closing: report the blocking way
            self._run(self._report(args))
            raise

    def set_cooldown(self, state: KeyState, seconds: float) -> None:
        fp = self._fps.get(state)
        if fp is not None and self.available():
            self._run(self._control("cooldown", fp, _text(float(seconds)), "set_ttl"))

    def enable(self, states: Collection[KeyState]) -> None:
        fps = [self._fps[state] for state in states if state in self._fps]
        if fps and self.available():
            self._run(self._control("enable", *fps))

    def snapshot(self, states: Collection[KeyState]) -> Mapping[KeyState, SharedKeyState] | None:
        fps = {state: self._fps[state] for state in states if state in self._fps}
        if not self.available():
            return None
        reply = self._run(self._control("snapshot", *fps.values()))
        if reply is None:
            return None
        try:
            rows = json.loads(reply)
            if not isinstance(rows, dict):  # cjson writes an empty object as {}
                rows = {}
            return {
                state: SharedKeyState(
                    where=str(row["where"]),
                    seconds_left=math.inf if row["where"] == "disabled" else float(row["left"]),
                    reason=str(row["reason"]), pool=str(row["pool"]), calls=int(row["calls"]),
                    successes=int(row["successes"]), rate_limits=int(row["rate_limits"]),
                    failures=int(row["failures"]), in_flight=int(row["in_flight"]),
                )
                for state, fp in fps.items()
                if (row := rows.get(fp)) is not None
            }
        except (ValueError, KeyError, TypeError) as exc:
            self._broken(StorageError(f"unreadable snapshot: {type(exc).__name__}"), self._epoch)
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()
        with self._lock:
            self._loops = weakref.WeakKeyDictionary()

    def forget_in_flight(self) -> None:
        """A forked child holds none of its parent's calls, loops or locks."""
        self._lock = threading.Lock()
        self._leases = {}
        self._pending = {}
        self._loops = weakref.WeakKeyDictionary()

    # for tests and tools --------------------------------------------------------------------
    @property
    def client(self) -> redis_sync.Redis:
        """The sync redis-py client (for inspection; the backend owns it)."""
        return self._client

