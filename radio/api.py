"""HTTP side door: status JSON, control (prompt, skip, reload), Prometheus metrics, a small web player.

It talks to the daemon only through the :class:`Controller` methods. Reads are open; every write needs
``Authorization: Bearer <token>`` when a token is configured (and one must be configured for a non-loopback
bind, and for a write that arrives through a reverse proxy). Errors are JSON ``{"error": ...}`` with
400/401/403/404/405/409/413; a handler bug is a logged 500, never a
traceback on the wire.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from .config import MAX_PROMPT_CHARS, ApiConfig, parse_duration
from .errors import ModelError
from .model import DTYPES

logger = logging.getLogger(__name__)

MAX_BODY = 16 * 1024


class Controller(Protocol):
    """What the API may ask of the daemon."""

    def status(self) -> dict[str, Any]: ...

    def set_prompt(self, station_id: str, prompt: str, title: str | None, duration: float | None,
                   blend: float) -> dict[str, Any] | None: ...

    def skip(self, station_id: str) -> dict[str, Any] | None: ...

    def set_model(self, station_id: str, model: str, dtype: str | None) -> dict[str, Any] | None: ...

    def request_reload(self) -> None: ...


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _metrics(status: dict[str, Any]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Snapshot:
        def collect(self):  # noqa: ANN202 - prometheus_client protocol
            stations = status.get("stations", [])
            per_station = [
                (GaugeMetricFamily, "radio_station_buffered_seconds", "Audio buffered ahead of real time",
                 "buffered_seconds"),
                (CounterMetricFamily, "radio_station_generated_seconds", "Audio generated", "generated_seconds"),
                (CounterMetricFamily, "radio_station_filled_seconds", "Audio filled while the generator was behind",
                 "filled_seconds"),
                (CounterMetricFamily, "radio_station_underruns", "Times the generator fell behind", "underruns"),
                (CounterMetricFamily, "radio_station_reconnects", "Icecast reconnects", "reconnects"),
                (CounterMetricFamily, "radio_station_encoder_restarts", "ffmpeg restarts", "encoder_restarts"),
                (GaugeMetricFamily, "radio_station_listeners", "Listeners on the mount (from Icecast)", "listeners"),
                (GaugeMetricFamily, "radio_station_connected", "1 while connected to Icecast", "connected"),
            ]
            for kind, name, doc, key in per_station:
                family = kind(name, doc, labels=["mount"])
                for st in stations:
                    value = st.get(key)
                    if value is not None:
                        family.add_metric([st["mount"]], float(value))
                yield family
            engine = status.get("engine", {})
            for name, doc, key in (("radio_engine_batch_size", "Stations in the last batched step", "batch_size"),
                                   ("radio_engine_step_seconds", "Wall time of the last batched step",
                                    "last_step_seconds"),
                                   ("radio_engine_realtime_factor", "Audio seconds generated per wall second",
                                    "realtime_factor")):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], float(engine.get(key, 0) or 0))
                yield g
            steps = CounterMetricFamily("radio_engine_steps", "Batched generation steps")
            steps.add_metric([], float(engine.get("steps", 0)))
            yield steps
            models = status.get("models", {})
            memory = GaugeMetricFamily("radio_model_memory_bytes", "Memory held by a loaded model", labels=["model"])
            for m in models.get("models", []):
                memory.add_metric([f"{m['name']} ({m['dtype']})"], float(m["memory_bytes"]))
            yield memory
            for name, doc, key, kind in (
                    ("radio_model_loads", "Model loads (startup and live swaps)", "loads", CounterMetricFamily),
                    ("radio_model_unloads", "Models unloaded because no station used them", "unloads",
                     CounterMetricFamily),
                    ("radio_model_memory_budget_bytes", "Memory budget for all models (0: none)",
                     "memory_budget_bytes", GaugeMetricFamily)):
                family = kind(name, doc)
                family.add_metric([], float(models.get(key) or 0))
                yield family
            up = GaugeMetricFamily("radio_uptime_seconds", "Seconds since the daemon started")
            up.add_metric([], float(status.get("uptime_seconds", 0)))
            yield up

    registry = CollectorRegistry()
    registry.register(Snapshot())
    return generate_latest(registry)


class _Handler(BaseHTTPRequestHandler):
    server_version = "radio"
    api: "ApiServer"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("api: %s %s", self.address_string(), format % args)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
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
        self.send_header("Access-Control-Expose-Headers", "Content-Type, Content-Length")

    def do_OPTIONS(self) -> None:  # noqa: N802 - CORS preflight for POST with a token and a JSON body
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, f"request body is {length} bytes; the limit is {MAX_BODY}")
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "body must be a JSON object")
        return data

    def _authorize(self) -> None:
        token = self.api.config.token
        if not token:
            if self.headers.get("X-Forwarded-For") or self.headers.get("Forwarded"):
                # Behind a reverse proxy the loopback bind no longer means "local": writes need a token.
                raise ApiError(403, "writes through a reverse proxy need a token: set RADIO_API_TOKEN "
                                    "(or api.token_file) and send 'Authorization: Bearer <token>'")
            return
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip(), token):
            raise ApiError(401, "missing or wrong token: send 'Authorization: Bearer <token>'")

    def _handle(self, method: str) -> None:
        try:
            path = self.path.split("?", 1)[0]
            if method in ("GET", "HEAD"):
                self._get(path)
            elif method == "POST":
                self._post(path)
            else:
                raise ApiError(405, f"{method} is not supported")
        except ApiError as exc:
            self._json(exc.status, {"error": exc.message})
        except Exception:  # noqa: BLE001 - a bug must not leak a traceback to the client or kill the server
            logger.exception("api: %s %s failed", method, self.path)
            self._json(500, {"error": "internal error; see the daemon log"})

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
            self._send(200, PAGE.encode("utf-8"), "text/html; charset=utf-8")
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
                self._json(200, self._set_prompt(station_id, body))
                return
            if action == "model":
                self._json(202, self._set_model(station_id, body))
                return
            if action == "skip":
                result = self.api.controller.skip(station_id)
                if result is None:
                    raise ApiError(404, f"no station with mount /{station_id}")
                self._json(200, result)
                return
        raise ApiError(404, f"no such action: POST {path}")

    def _set_prompt(self, station_id: str, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt: required, non-empty text")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt: {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        title = body.get("title")
        if title is not None and (not isinstance(title, str) or len(title) > 200):
            raise ApiError(400, "title: must be text of at most 200 characters")
        duration = blend = None
        if body.get("duration") is not None:
            duration = parse_duration(body["duration"])
            if duration is None or duration <= 0:
                raise ApiError(400, "duration: must be a duration such as 90, '90s' or '3m'")
        if body.get("blend") is not None:
            blend = parse_duration(body["blend"])
            if blend is None or blend < 0 or blend > 600:
                raise ApiError(400, "blend: must be a duration from 0 to 10m, e.g. 8 or '8s'")
        result = self.api.controller.set_prompt(station_id, prompt.strip(), title, duration, blend or 0.0)
        if result is None:
            raise ApiError(404, f"no station with mount /{station_id}")
        return result


    def _set_model(self, station_id: str, body: dict[str, Any]) -> dict[str, Any]:
        model = body.get("model")
        if not isinstance(model, str) or not model.strip() or len(model) > 500:
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


class ApiServer:
    """The HTTP server thread."""

    def __init__(self, config: ApiConfig, controller: Controller) -> None:
        self.config = config
        self.controller = controller
        handler = type("Handler", (_Handler,), {"api": self})
        self.httpd = ThreadingHTTPServer((config.host, config.port), handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="api", daemon=True)
        self._thread.start()
        logger.info("control API and web player: http://%s:%d/", self.config.host, self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>radio</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; margin: 0; background: #14161a; color: #e8e8e8; }
  header { padding: 1.2rem 1.5rem; font-size: 1.4rem; font-weight: 600; }
  main { display: grid; gap: 1rem; padding: 0 1.5rem 1.5rem; grid-template-columns: repeat(auto-fill, minmax(18rem, 1fr)); }
  .station { background: #1f232a; border-radius: 10px; padding: 1rem; }
  .name { font-weight: 600; font-size: 1.1rem; }
  .desc { color: #aab; font-size: .9rem; margin: .2rem 0 .6rem; }
  .now { margin: .4rem 0; } .now b { color: #8fd3ff; }
  .meta { color: #889; font-size: .8rem; }
  button { background: #2d6cdf; color: white; border: 0; border-radius: 6px; padding: .5rem 1rem; font-size: 1rem; cursor: pointer; }
  button.playing { background: #d9534f; }
</style>
</head>
<body>
<header>radio</header>
<main id="stations"><p id="loading">Loading stations...</p></main>
<script>
const players = {};
function card(st) {
  let el = document.getElementById("st-" + st.mount);
  if (!el) {
    el = document.createElement("section");
    el.className = "station"; el.id = "st-" + st.mount;
    el.innerHTML = '<div class="name"></div><div class="desc"></div>' +
      '<div class="now">Now playing: <b class="title"></b></div><div class="meta"></div>' +
      '<p><button class="play">Play</button></p>';
    const audio = document.createElement("audio");
    audio.preload = "none"; audio.dataset.src = st.listen_url; el.appendChild(audio);
    players[st.mount] = audio;
    el.querySelector(".play").addEventListener("click", () => toggle(st.mount, el));
    document.getElementById("stations").appendChild(el);
  }
  el.querySelector(".name").textContent = st.name;
  el.querySelector(".desc").textContent = st.description || "";
  el.querySelector(".title").textContent = st.now_playing || "...";
  el.querySelector(".meta").textContent = st.format + " " + st.bitrate + " kbit/s, " +
    (st.listeners == null ? "?" : st.listeners) + " listening, next: " + (st.next || "-");
}
function toggle(mount, el) {
  const audio = players[mount], button = el.querySelector(".play");
  if (audio.paused) {
    audio.src = audio.dataset.src + (audio.dataset.src.includes("?") ? "&" : "?") + "t=" + Date.now();
    audio.play(); button.textContent = "Stop"; button.classList.add("playing");
  } else {
    audio.pause(); audio.removeAttribute("src"); audio.load();
    button.textContent = "Play"; button.classList.remove("playing");
  }
}
async function refresh() {
  try {
    const res = await fetch("status", {cache: "no-store"});
    const status = await res.json();
    const loading = document.getElementById("loading");
    if (loading) loading.remove();
    status.stations.forEach(card);
  } catch (e) { /* the daemon restarts: try again */ }
}
refresh(); setInterval(refresh, 2000);
</script>
</body>
</html>
"""
