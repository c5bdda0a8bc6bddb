"""The HTTP side of the simulator: a threaded HTTP/1.1 server speaking OpenAI's wire format.

Each connection gets a daemon thread (keep-alive, so a client reuses it). Handlers do the slow
parts (sleeping, writing) outside the state lock; ``SimState`` decides, the handler answers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import selectors
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, cast
from urllib.parse import urlsplit

from . import _wire
from ._config import SimulatorConfig
from ._state import SimState, Ticket, Verdict

MAX_BODY_BYTES = 64 * 1024 * 1024
IDLE_TIMEOUT = 120.0
"""Seconds an idle keep-alive connection is kept open."""

Headers = tuple[tuple[str, str], ...]


def _check_loopback(host: str) -> None:
    """The simulator serves fake credentials and answers: never expose it beyond this host."""
    if not isinstance(host, str):
        raise TypeError(f"host: must be a string, got {type(host).__name__}")
    if host == "localhost":
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None or not address.is_loopback:
        raise ValueError(
            f"host: must be a loopback address (127.x.x.x, localhost or ::1), got {host!r}"
        )


class _SimHTTPServer(ThreadingHTTPServer):
    """Threaded server that stops at once and closes idle keep-alive connections on stop.

    ``serve_forever``/``shutdown`` are replaced by a loop that also watches a wake-up socket,
    so ``shutdown`` does not wait out a poll interval (tests start and stop many servers).
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: SimState, family: int) -> None:
        self.address_family = family
        self.state = state
        self.will_serve = False
        self.loop_ident: int | None = None
        self._connections: set[Any] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        self._stop_requested = False
        self._loop_done = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._close_wake()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a DNS lookup that can stall offline.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.loop_ident = threading.get_ident()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop_requested:
                    ready = selector.select(poll_interval)
                    if self._stop_requested:
                        break
                    for key, _ in ready:
                        if key.fileobj is self:
                            self._accept()
                    self.service_actions()
        finally:
            self._loop_done.set()

    def _accept(self) -> None:
        """Accept one connection and hand it to a handler thread (as BaseServer does)."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (called from another thread) and wait until it has returned."""
        self._stop_requested = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._loop_done.wait()

    def server_close(self) -> None:
        super().server_close()
        self._close_wake()

    def _close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            if self._closing:
                self.shutdown_request(request)
                return
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Refuse new connections and wake every handler blocked on an open one."""
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (or a stop() that closes it) is normal; only report bugs.
        if isinstance(sys.exc_info()[1], OSError) or self._closing:
            return
        super().handle_error(request, client_address)


Route = Callable[["_Handler", Ticket, bytes], None]


class _Handler(BaseHTTPRequestHandler):
    """One connection; ``handle_one_request`` calls ``do_<METHOD>`` per request."""

    protocol_version = "HTTP/1.1"
    server_version = "stable-openai-simulator"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default one-line-per-request stderr log."""

    @property
    def _state(self) -> SimState:
        return cast(_SimHTTPServer, self.server).state

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, method: str) -> None:
        self._started = time.monotonic()
        self._ticket: Ticket | None = None
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            return
        if path.startswith("/_sim/"):
            self._admin(method, path)
            return
        route = _ROUTES.get((method, path.rstrip("/")))
        if route is None:
            headers = (("x-request-id", _wire.new_request_id()),)
            self._send_json(404, _wire.invalid_url_body(method, path), headers)
            return
        api_key = self._bearer_key()
        state = self._state
        ticket = state.begin(api_key)
        self._ticket = ticket
        try:
            rejection = state.check_key(ticket, api_key)
            if rejection is not None:
                self._send_json(rejection.status, rejection.body, rejection.headers)
                return
            route(self, ticket, body)
        finally:
            self._end_ticket()

    def _end_ticket(self) -> None:
        """Take the current request out of flight, once, just before its last bytes go out.

        Done before writing so that a client that has seen its answer also sees it counted.
        """
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self._state.end(ticket)

    def _bearer_key(self) -> str | None:
        value = self.headers.get("Authorization", "")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        return token

    def _read_body(self) -> bytes | None:
        """Read the whole request body (so keep-alive stays in sync); None if answered."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""
        try:
            length = int(raw_length)
            if length < 0:
                raise ValueError(raw_length)
        except ValueError:
            self.close_connection = True
            self._send_json(400, _wire.bad_param_body("Invalid Content-Length.", None), ())
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, _wire.bad_param_body("Request body too large.", None), ())
            return None
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            return None
        return data

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                self._send_json(400, _wire.bad_param_body("Invalid chunked body.", None), ())
                return None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                self._send_json(413, _wire.bad_param_body("Request body too large.", None), ())
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    # ----------------------------------------------------------------- writing

    def _head(self, status: int, headers: Headers) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Date: {self.date_time_string()}",
            f"Server: {self.server_version}",
            "openai-version: 2020-10-01",
        ]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if self.close_connection:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_json(self, status: int, body: Any, headers: Headers) -> None:
        data = json.dumps(body).encode("utf-8")
        head = self._head(
            status,
            (*headers, ("Content-Type", "application/json"), ("Content-Length", str(len(data)))),
        )
        self._end_ticket()
        self.wfile.write(head + data)

    def _processing_ms(self) -> tuple[str, str]:
        return ("openai-processing-ms", str(int((time.monotonic() - self._started) * 1000)))

    def _send_ok(self, ticket: Ticket, verdict: Verdict, body: Any) -> None:
        self._state.record_ok(ticket)
        self._send_json(200, body, (*verdict.headers, self._processing_ms()))

    def _send_stream(self, ticket: Ticket, verdict: Verdict, chunks: list[Any]) -> None:
        """Server-Sent Events, chunked so the connection can be kept alive."""
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        headers = (
            *verdict.headers,
            self._processing_ms(),
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-cache"),
        )
        if chunked:
            headers += (("Transfer-Encoding", "chunked"),)
        self._state.record_ok(ticket)
        self.wfile.write(self._head(200, headers))
        events = [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks]
        events.append(b"data: [DONE]\n\n")
        framed = [b"%x\r\n%s\r\n" % (len(e), e) if chunked else e for e in events]
        if chunked:
            framed[-1] += b"0\r\n\r\n"
        for event in framed[:-1]:
            self.wfile.write(event)
        self._end_ticket()
        self.wfile.write(framed[-1])

    def _drop(self) -> None:
        """Close the connection without answering (a fault: the client sees a disconnect)."""
        self.close_connection = True
        self._end_ticket()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _admitted(self, verdict: Verdict) -> bool:
        """Sleep the verdict's delay, then answer any fault; True if the request may succeed."""
        if verdict.delay > 0:
            time.sleep(verdict.delay)
        if verdict.drop:
            self._drop()
            return False
        if verdict.status != 200:
            self._send_json(verdict.status, verdict.body, verdict.headers)
            return False
        return True

    def _bad_request(self, ticket: Ticket, body: dict[str, Any]) -> None:
        self._state.record(ticket, "invalid")
        self._send_json(400, body, self._state.identity_headers(ticket))

    def _parse(self, ticket: Ticket, raw: bytes) -> dict[str, Any] | None:
        try:
            payload = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self._bad_request(ticket, _wire.invalid_json_body())
            return None
        if not isinstance(payload, dict):
            self._bad_request(ticket, _wire.invalid_json_body())
            return None
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            self._bad_request(
                ticket, _wire.bad_param_body("you must provide a model parameter", None)
            )
            return None
        return payload

    # ----------------------------------------------------------------- endpoints

    def _chat(self, ticket: Ticket, raw: bytes) -> None:
        payload = self._parse(ticket, raw)
        if payload is None:
            return
        model: str = payload["model"]
        messages = payload.get("messages")
        if messages is None:
            self._bad_request(
                ticket,
                _wire.bad_param_body(
                    "Missing required parameter: 'messages'.",
                    "messages",
                    "missing_required_parameter",
                ),
            )
            return
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self._bad_request(
                ticket,
                _wire.bad_param_body(
                    "Invalid type for 'messages': expected an array of objects.",
                    "messages",
                    "invalid_type",
                ),
            )
            return
        max_tokens = payload.get("max_completion_tokens")
        name = "max_completion_tokens"
        if max_tokens is None:
            max_tokens, name = payload.get("max_tokens"), "max_tokens"
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            self._bad_request(
                ticket,
                _wire.bad_param_body(
                    f"Invalid '{name}': expected an integer of at least 1.", name, "invalid_value"
                ),
            )
            return
        stream = payload.get("stream") is True
        options = payload.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )

        verdict = self._state.admit(ticket, model, _wire.chat_request_cost(messages, max_tokens))
        if not self._admitted(verdict):
            return
        if stream:
            self._send_stream(ticket, verdict, _wire.chat_chunks(model, messages, include_usage))
        else:
            self._send_ok(ticket, verdict, _wire.chat_completion(model, messages))

    def _embeddings(self, ticket: Ticket, raw: bytes) -> None:
        payload = self._parse(ticket, raw)
        if payload is None:
            return
        model: str = payload["model"]
        inputs = _embedding_inputs(payload.get("input"))
        if inputs is None:
            self._bad_request(
                ticket,
                _wire.bad_param_body(
                    "Invalid 'input': expected a non-empty string, array of strings or array of "
                    "token arrays.",
                    "input",
                    "invalid_type",
                ),
            )
            return
        texts, tokens = inputs
        encoding = payload.get("encoding_format", "float")
        if encoding not in ("float", "base64", None):
            self._bad_request(
                ticket,
                _wire.bad_param_body(
                    "Invalid 'encoding_format': expected 'float' or 'base64'.",
                    "encoding_format",
                    "invalid_value",
                ),
            )
            return
        verdict = self._state.admit(ticket, model, tokens, operation="Embeddings_Create")
        if not self._admitted(verdict):
            return
        body = _wire.embeddings_response(model, texts, tokens, encoding == "base64")
        self._send_ok(ticket, verdict, body)

    def _models(self, ticket: Ticket, raw: bytes) -> None:
        verdict = self._state.admit(ticket, "models", 0, budgeted=False)
        if not self._admitted(verdict):
            return
        self._send_ok(ticket, verdict, _wire.models_response())

    def _admin(self, method: str, path: str) -> None:
        """Unauthenticated control endpoints for demos and scripts (loopback only)."""
        headers = (("x-request-id", _wire.new_request_id()),)
        route = (method, path.rstrip("/"))
        if route == ("GET", "/_sim/stats"):
            self._send_json(200, self._state.stats(), headers)
        elif route == ("POST", "/_sim/reset"):
            self._state.reset_stats()
            self._send_json(200, {"reset": True}, headers)
        else:
            self._send_json(404, _wire.invalid_url_body(method, path), headers)


def _embedding_inputs(value: object) -> tuple[list[str], int] | None:
    """Texts to embed and their token cost, or None if ``input`` is malformed.

    Token arrays are embedded by their decimal text and cost one token per element.
    """
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        texts = cast("list[str]", value)
        return texts, _wire.tokens_for_chars(sum(len(t) for t in texts))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = [value]
    if all(
        isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        for v in value
    ):
        arrays = cast("list[list[int]]", value)
        return [" ".join(map(str, a)) for a in arrays], sum(len(a) for a in arrays)
    return None


_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/chat/completions"): _Handler._chat,
    ("POST", "/v1/embeddings"): _Handler._embeddings,
    ("GET", "/v1/models"): _Handler._models,
}


class Simulator:
    """A local OpenAI-compatible server for tests, demos and benchmarks.

    Use as a context manager (``with Simulator(config) as sim:``) or ``start()``/``stop()``;
    point a client at ``sim.base_url``. It binds only to loopback addresses.
    """

    def __init__(
        self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        _check_loopback(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port: must be an integer between 0 and 65535, got {port!r}")
        if config is None:
            config = SimulatorConfig()
        elif not isinstance(config, SimulatorConfig):
            raise TypeError(f"config: must be a SimulatorConfig, got {type(config).__name__}")
        self._host = host
        self._port = port
        self._state = SimState(config)
        self._life = threading.RLock()
        self._server: _SimHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    # ----------------------------------------------------------------- life cycle

    def _bind(self) -> _SimHTTPServer:
        with self._life:
            if self._server is None:
                family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
                host = "127.0.0.1" if self._host == "localhost" else self._host
                self._server = _SimHTTPServer((host, self._port), self._state, family)
                self._bound_port = int(self._server.server_address[1])
            return self._server

    def start(self) -> Simulator:
        """Serve in a daemon thread; returns self. Starting twice is a no-op."""
        with self._life:
            if self._thread is not None:
                return self
            server = self._bind()
            if server.will_serve:
                raise RuntimeError("simulator is already serving in the foreground")
            server.will_serve = True
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"stable-openai-simulator:{self._bound_port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` or KeyboardInterrupt (for the CLI)."""
        with self._life:
            server = self._bind()
            if server.will_serve:
                raise RuntimeError("simulator is already serving")
            server.will_serve = True
        try:
            server.serve_forever(poll_interval=0.05)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, close every connection and the socket, join the thread. Idempotent."""
        with self._life:
            server, thread = self._server, self._thread
            self._server = None
            self._thread = None
        if server is None:
            return
        if server.will_serve and server.loop_ident != threading.get_ident():
            server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with ``port=0``)."""
        if self._bound_port is None:
            raise RuntimeError("simulator is not started")
        return self._bound_port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the server root)."""
        host = "127.0.0.1" if self._host == "localhost" else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``url + "/v1"``: what to pass as ``openai.OpenAI(base_url=...)``."""
        return self.url + "/v1"

    # ----------------------------------------------------------------- state

    @property
    def config(self) -> SimulatorConfig:
        """The current configuration."""
        return self._state.config

    def configure(self, config: SimulatorConfig) -> None:
        """Replace the configuration at runtime (counters and windows are kept)."""
        if not isinstance(config, SimulatorConfig):
            raise TypeError(f"config: must be a SimulatorConfig, got {type(config).__name__}")
        self._state.configure(config)

    def reset_limits(self) -> None:
        """Forget every limit's usage and start the windows now (counters are kept)."""
        self._state.reset_limits()

    def set_key_status(self, key: str, status: str) -> None:
        """Change a key's status at runtime, e.g. revoke it mid-run (KeyError if unknown)."""
        self._state.set_key_status(key, status)

    def stats(self) -> dict[str, Any]:
        """Counters: ``{"totals": {...}, "keys": {label: {...}}, "projects": {name: {...}}}``."""
        return self._state.stats()

    def key_stats(self, key: str) -> dict[str, int]:
        """Counters of one key, looked up by the real key (KeyError if unknown)."""
        return self._state.key_stats(key)

    def reset_stats(self) -> None:
        """Zero all counters."""
        self._state.reset_stats()

    def __repr__(self) -> str:
        where = self.url if self._bound_port is not None else "not started"
        return f"Simulator({where}, keys={len(self.config.keys)})"
