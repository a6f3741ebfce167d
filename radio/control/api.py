"""HTTP side door: status JSON, control (prompt, skip, reload), Prometheus metrics, a small web player.

It talks to the daemon only through the :class:`Controller` methods. Reads are open; every write needs
``Authorization: Bearer <token>`` when a token is configured (and one must be configured for a non-loopback
bind, and for a write that arrives through a reverse proxy). Errors are JSON ``{"error": ...}`` with
400/401/403/404/405/409/413; a handler bug is a logged 500, never a
traceback on the wire. A change the engine applies between model steps answers at once: 200 once applied, or
202 with ``accepted`` (what is pending and about when it applies).
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import sys
import threading
from importlib import resources
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from ..config import (DTYPES, MAX_BLEND_S, MAX_DURATION_S, MAX_PROMPT_CHARS, MAX_TITLE_CHARS, ApiConfig,
                     duration_value, text_problem)
from ..engine import EngineStatus
from ..errors import ModelError, RadioError, RequestRefused
from ..output.mount import MountStatus
from ..pool import ModelStatus, PoolStatus
from ..station.requests import RequestsStatus
from ..station.station import StationStatus
from ..status import Metric, exported_fields

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
HANG_UPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send its headers and body, or sit idle between requests
MAX_CONNECTIONS = 64  # requests served at once; more get a quick 503
BACKLOG = 128
# Any of these, even empty, means the request came through a reverse proxy: the loopback bind no longer
# proves the client is local.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
                      "x-forwarded-server", "x-forwarded-prefix", "x-real-ip", "x-client-ip", "true-client-ip",
                      "cf-connecting-ip", "via")


class Controller(Protocol):
    """What the API may ask of the daemon."""

    def status(self) -> dict[str, Any]: ...

    def set_prompt(self, station_id: str, prompt: str, title: str | None, duration: float | None,
                   blend: float) -> dict[str, Any] | None: ...

    def skip(self, station_id: str) -> dict[str, Any] | None: ...

    def set_model(self, station_id: str, model: str, dtype: str | None) -> dict[str, Any] | None: ...

    def request_reload(self) -> None: ...

    def request(self, station_id: str, prompt: object, name: object, client: str) -> dict[str, Any] | None: ...

    def requests(self, station_id: str) -> dict[str, Any] | None: ...

    def remove_request(self, station_id: str, request_id: str) -> dict[str, Any] | None: ...


@functools.lru_cache(maxsize=1)
def web_page() -> bytes:
    """The web player: a static page shipped as package data."""
    return resources.files(__package__).joinpath("static/index.html").read_bytes()


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this API accepts")


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _family(metric: Metric, labels: list[str]) -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = labels + ([metric.label] if metric.label else [])
    return (CounterMetricFamily if metric.counter else GaugeMetricFamily)(metric.name, metric.doc, labels=labels)


def _sample(family: Any, labels: list[str], value: object, metric: Metric) -> None:
    """A status value as samples: a number (bools too) as one; a dict of counts (``metric.label``) as one per
    key; anything else (None: unknown) as none."""
    if metric.label and isinstance(value, dict):
        for key, n in value.items():
            if isinstance(n, (int, float)):
                family.add_metric([*labels, str(key)], float(n))
    elif isinstance(value, (int, float)):
        family.add_metric(labels, float(value))


def _metrics(status: dict[str, Any]) -> bytes:
    """Prometheus text from a ``/status`` snapshot: the fields the status records declare exported
    (:mod:`radio.status`: the engine's, each station's, its mount's and requests', the pool's and each model's),
    the listener counts and the uptime."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    class Snapshot:
        def collect(self):  # noqa: ANN202 - prometheus_client protocol
            stations = status.get("stations", [])
            # Every exported field of the records a station's status is made of (the station's, its mount's), and
            # the listener count the daemon adds from Icecast.
            per_station = [*exported_fields(StationStatus), *exported_fields(MountStatus),
                           ("listeners", Metric("radio_station_listeners", "Listeners on the mount (from Icecast)"))]
            for key, metric in per_station:
                family = _family(metric, ["mount"])
                for st in stations:
                    _sample(family, [str(st.get("mount", "?"))], st.get(key), metric)
                yield family
            for key, metric in exported_fields(RequestsStatus):  # while a station takes requests
                family = _family(metric, ["mount"])
                for st in stations:
                    req = st.get("requests")
                    if isinstance(req, dict) and req.get("enabled"):
                        _sample(family, [str(st.get("mount", "?"))], req.get(key), metric)
                yield family
            engine = status.get("engine", {})
            for key, metric in exported_fields(EngineStatus):
                family = _family(metric, [])
                family.add_metric([], float(engine.get(key, 0) or 0))
                yield family
            models = status.get("models", {})
            for key, metric in exported_fields(ModelStatus):
                family = _family(metric, ["model"])
                for m in models.get("models", []):
                    _sample(family, [f"{m['name']} ({m['dtype']})"], m.get(key), metric)
                yield family
            for key, metric in exported_fields(PoolStatus):
                family = _family(metric, [])
                family.add_metric([], float(models.get(key) or 0))
                yield family
            up = GaugeMetricFamily("radio_uptime_seconds", "Seconds since the daemon started")
            up.add_metric([], float(status.get("uptime_seconds", 0)))
            yield up

    registry = CollectorRegistry()
    registry.register(Snapshot())
    return generate_latest(registry)


def _request_route(path: str) -> tuple[str, str | None] | None:
    """(station id, request id or None) for ``/stations/<id>/requests[/<request id>]``, else None (a mount
    whose name merely contains "requests" keeps its other routes)."""
    if not path.startswith("/stations/"):
        return None
    head, _, last = path[len("/stations/"):].rstrip("/").rpartition("/")
    if last == "requests" and head:
        return head, None
    station, _, middle = head.rpartition("/")
    if middle == "requests" and station and last:
        return station, last
    return None


class _Handler(BaseHTTPRequestHandler):
    server_version = "radio"
    sys_version = ""
    timeout = REQUEST_TIMEOUT  # socket timeout: a client that stalls in its headers, body or keep-alive is dropped
    api: "ApiServer"

    def version_string(self) -> str:
        return "radio"  # no Python or library versions on the wire

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("api: %s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, retry_after: float | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if retry_after is not None:
            self.send_header("Retry-After", str(max(1, int(retry_after + 0.999))))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self._cors()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _cors(self) -> None:
        # Any page may read the status and drive the API: writes are guarded by the Bearer token, not by
        # cookies, so a wildcard origin grants nothing a token does not.
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", "Content-Type, Content-Length, Retry-After")

    def do_OPTIONS(self) -> None:  # noqa: N802 - CORS preflight for POST with a token and a JSON body
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, status: int, data: Any, retry_after: float | None = None) -> None:
        # "replace": text that is not valid Unicode (it cannot come in through validation, but a bug must not
        # turn every status request into a 500) is sent with a replacement character.
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8", "replace"),
                   "application/json; charset=utf-8", retry_after)

    def _body(self) -> dict[str, Any]:
        raw = self._read_body()
        if not raw:
            return {}
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise ApiError(400, f"body is not JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "body is nested too deeply; send a flat JSON object") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        return data

    def _read_body(self) -> bytes:
        """The request body, refused before it is read when it would exceed MAX_BODY."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        text = (self.headers.get("Content-Length") or "0").strip()
        if not text.isdigit():
            self.close_connection = True  # the framing is unknown: the connection cannot be reused
            raise ApiError(400, f"Content-Length must be a whole number of bytes, got {text[:20]!r}")
        length = int(text)
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"request body is {length} bytes; the limit is {MAX_BODY}")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            line = self.rfile.readline(64).split(b";", 1)[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked body") from None
            if size < 0 or len(body) + size > MAX_BODY:
                self.close_connection = True
                raise ApiError(413, f"request body exceeds the limit of {MAX_BODY} bytes")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline(8)  # the CRLF after each chunk

    def _client(self) -> str:
        """Who is asking: the peer's address, or, when the peer is this host's reverse proxy (loopback) and it
        set ``X-Forwarded-For``, the LAST address there: the one the proxy itself appended (nginx's
        ``$proxy_add_x_forwarded_for``). Entries a client sends itself end up before it and are never read."""
        peer = str(self.client_address[0])
        forwarded = self.headers.get_all("X-Forwarded-For") or []
        if forwarded and (peer.startswith("127.") or peer in ("::1", "::ffff:127.0.0.1")):
            last = forwarded[-1].split(",")[-1].strip()
            if last:
                return last[:64]
        return peer

    def _proxied(self) -> bool:
        present = {name.lower() for name in self.headers.keys()}
        return any(h in present for h in FORWARDING_HEADERS)

    def _authorize(self) -> None:
        token = self.api.config.token
        if not token:
            if self._proxied():
                # Behind a reverse proxy the loopback bind no longer means "local": writes need a token.
                raise ApiError(403, "writes through a reverse proxy need a token: set RADIO_API_TOKEN "
                                    "(or api.token_file) and send 'Authorization: Bearer <token>'")
            return
        scheme, _, given = self.headers.get("Authorization", "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110); compare the token as bytes so odd input cannot raise.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                 token.encode("utf-8")):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def _handle(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0]
            route = _request_route(path)
            if route is not None:
                self._requests(method, *route)
            elif method in ("GET", "HEAD"):
                self._get(path)
            elif method == "POST":
                self._post(path)
            else:
                raise ApiError(405, f"{method} is not supported")
        except HANG_UPS:
            raise  # the client went away: nothing to answer (see handle_one_request)
        except ApiError as exc:
            self._json(exc.status, {"error": exc.message}, exc.retry_after)
        except RequestRefused as exc:
            status = 429 if exc.retry_after is not None else 400
            self._json(status, {"error": str(exc), "reason": exc.reason}, exc.retry_after)
        except RadioError as exc:  # the daemon refused or could not apply it
            self._json(409, {"error": str(exc)})
        except Exception:  # noqa: BLE001 - a bug must not leak a traceback to the client or kill the server
            logger.exception("api: %s %s failed", method, self.path)
            self._json(500, {"error": "internal error; see the daemon log"})

    def handle_one_request(self) -> None:
        """A client that hangs up before its answer (a closed tab, a timeout) is normal traffic: a debug line,
        never a traceback."""
        try:
            super().handle_one_request()
        except HANG_UPS as exc:
            self.close_connection = True
            logger.debug("api: %s hung up: %s", self.client_address[0], type(exc).__name__)

    def do_GET(self) -> None:  # noqa: N802 - stdlib names
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    # -- routes -----------------------------------------------------------------------------------------------
    def _get(self, path: str) -> None:
        if path in ("/", "/index.html"):
            self._send(200, web_page(), "text/html; charset=utf-8")
        elif path == "/status":
            self._json(200, self.api.controller.status())
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            self._send(200, _metrics(self.api.controller.status()), CONTENT_TYPE_LATEST)
        else:
            raise ApiError(404, f"no such page: {path}")

    def _post(self, path: str) -> None:
        self._authorize()
        body = self._body()
        if path == "/reload":
            self.api.controller.request_reload()
            self._json(202, {"reload": "requested"})
            return
        if path.startswith("/stations/"):
            station_id, _, action = path[len("/stations/"):].rpartition("/")
            if action == "prompt":
                result = self._set_prompt(station_id, body)
                self._json(202 if "accepted" in result else 200, result)
                return
            if action == "model":
                self._json(202, self._set_model(station_id, body))
                return
            if action == "skip":
                skipped = self.api.controller.skip(station_id)
                if skipped is None:
                    raise ApiError(404, f"no station with mount /{station_id}")
                self._json(202 if "accepted" in skipped else 200, skipped)
                return
        raise ApiError(404, f"no such action: POST {path}")

    def _requests(self, method: str, station_id: str, request_id: str | None) -> None:
        """Listener requests: ``POST /stations/{id}/requests`` (public), ``GET`` the queue (public), ``DELETE
        /stations/{id}/requests/{request}`` (the operator's token)."""
        controller = self.api.controller
        off = ApiError(404, f"no station with mount /{station_id} takes requests")
        if request_id is None and method in ("GET", "HEAD"):
            queue = controller.requests(station_id)
            if queue is None:
                raise off
            self._json(200, queue)
        elif request_id is None and method == "POST":
            body = self._body()
            unknown = sorted(set(body) - {"prompt", "name"})
            if unknown:
                raise ApiError(400, f"{unknown[0][:40]}: unknown field; known fields: prompt, name")
            result = controller.request(station_id, body.get("prompt"), body.get("name"), self._client())
            if result is None:
                raise off
            self._json(202, result)
        elif request_id is not None and method == "DELETE":
            self._authorize()
            result = controller.remove_request(station_id, request_id)
            if result is None:
                raise ApiError(404, f"no request {request_id[:40]!r} waiting on /{station_id}")
            self._json(200, result)
        else:
            raise ApiError(405, f"{method} is not supported here: POST or GET /stations/<id>/requests, "
                                "DELETE /stations/<id>/requests/<request id>")

    def _set_prompt(self, station_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Everything is validated, by the rules station files obey, before anything is applied."""
        unknown = sorted(set(body) - {"prompt", "title", "duration", "blend"})
        if unknown:
            raise ApiError(400, f"{unknown[0]}: unknown field; known fields: prompt, title, duration, blend")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt: required, non-empty text")
        problem = text_problem(prompt, MAX_PROMPT_CHARS)
        if problem:
            raise ApiError(400, f"prompt: {problem}")
        title = body.get("title")
        if title is not None:
            if not isinstance(title, str):
                raise ApiError(400, f"title: must be text of at most {MAX_TITLE_CHARS} characters")
            problem = text_problem(title, MAX_TITLE_CHARS)
            if problem:
                raise ApiError(400, f"title: {problem}")
        duration = blend = None
        if body.get("duration") is not None:
            duration, problem = duration_value(body["duration"], 0.0, MAX_DURATION_S, lo_open=True)
            if problem:
                raise ApiError(400, f"duration: {problem}")
        if body.get("blend") is not None:
            blend, problem = duration_value(body["blend"], 0.0, MAX_BLEND_S)
            if problem:
                raise ApiError(400, f"blend: {problem}")
            if duration is not None and blend is not None and blend > duration:
                raise ApiError(400, f"blend: {blend:g}s is longer than the item ({duration:g}s)")
        result = self.api.controller.set_prompt(station_id, prompt.strip(), title.strip() if title else None,
                                                duration, blend or 0.0)
        if result is None:
            raise ApiError(404, f"no station with mount /{station_id}")
        return result

    def _set_model(self, station_id: str, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if not isinstance(model, str) or text_problem(model, 500):
            raise ApiError(400, "model: required: a hub id such as facebook/musicgen-small or a checkpoint directory")
        dtype = body.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ApiError(400, f"dtype: must be one of {', '.join(DTYPES)}")
        try:
            result = self.api.controller.set_model(station_id, model.strip(), dtype)
        except ModelError as exc:
            raise ApiError(409, str(exc)) from None
        if result is None:
            raise ApiError(404, f"no station with mount /{station_id}")
        return result


_BUSY = b'{"error": "busy; try again"}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nServer: radio\r\nContent-Type: application/json\r\n"
                 b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY))


class _BoundedServer(ThreadingHTTPServer):
    """A threading server with a real listen backlog and at most MAX_CONNECTIONS requests in flight; past that a
    client gets an immediate 503 instead of a thread, so a flood cannot exhaust the process."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Whatever escaped a handler: a hang-up is a debug line; anything else one logged error (the default
        prints a traceback to stderr)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, HANG_UPS):
            logger.debug("api: %s hung up: %s", client_address[0] if client_address else "?", type(exc).__name__)
            return
        logger.error("api: request from %s failed: %s", client_address[0] if client_address else "?", exc,
                     exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ApiServer:
    """The HTTP server thread."""

    def __init__(self, config: ApiConfig, controller: Controller) -> None:
        self.config = config
        self.controller = controller
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = _BoundedServer((config.host, config.port), handler)
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)
        self._thread.start()
        logger.info("control API and web player: http://%s:%d/", self.config.host, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
