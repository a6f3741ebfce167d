"""Lifecycle: model -> (local Icecast) -> engine and stations -> mounts; stop in reverse, in ``finally``.

Signal handlers only set a flag. Startup happens in a fixed order; a fatal startup error raises one of our
exceptions, which the CLI turns into one log line and a non-zero exit.
"""

from __future__ import annotations

import functools
import logging
import random
import signal
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from .config import MAX_STATIONS, DaemonConfig, StationConfig, load_stations
from .control.watch import StationFiles
from .engine import Engine
from .station.idents import load_idents
from .errors import ModelError, RadioError
from .control.api import ApiServer
from .control.commands import Commands
from .output.audience import Audience
from .output.local import LocalIcecast, find_icecast_xml, free_port, port_is_free
from .musicgen.model import MusicModel, MusicgenModel, estimate_model_bytes
from .output.mount import Mount
from .native import bound_kernel_caches, trim, tune_allocator
from .pool import ModelPool, ModelSpec, model_spec, resolve_budget
from .station.station import Station

logger = logging.getLogger(__name__)

ModelFactory = Callable[[DaemonConfig], MusicModel]


def load_model(cfg: DaemonConfig) -> MusicModel:
    """The real loader; the daemon calls it with ``cfg.model``/``cfg.dtype`` set to the model wanted."""
    return MusicgenModel(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed,
                         window_seconds=cfg.engine.window_seconds, decoder=cfg.engine.decoder,
                         weights=cfg.engine.weights, kv=cfg.engine.kv, compile=cfg.engine.compile,
                         codec=cfg.engine.codec, kernels=cfg.engine.kernels)


class _Stopping(Exception):
    """A stop was requested while starting up: start() unwinds and run() stops what was started."""


class Daemon:
    """Owns every running part. ``start``/``stop`` may be used directly (tests); ``run`` blocks until a signal."""

    def __init__(self, config: DaemonConfig, stations: list[StationConfig], model_factory: ModelFactory = load_model,
                 icecast_xml: str | None = None, stop_deadline: float = 5.0) -> None:
        self.config = config
        self.station_configs = stations
        self.model_factory = model_factory
        self.icecast_xml = icecast_xml
        self.stop_deadline = stop_deadline
        self.pool: ModelPool | None = None
        self.api: ApiServer | None = None
        self.audience: Audience | None = None
        self.local_icecast: LocalIcecast | None = None
        self.engine: Engine | None = None
        self.stations: dict[str, Station] = {}
        self.mounts: dict[str, Mount] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._stop_or_reload = threading.Event()
        self.commands = Commands(self)  # the API's commands to stations
        self.files = StationFiles(config.stations_dir)  # the stations directory as last read
        self._failed: dict[str, StationConfig] = {}  # stations whose model could not be loaded, as last tried

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        tune_allocator()  # before the engine, mounts and API start their threads
        bound_kernel_caches()  # before the first model runs
        cfg = self.config
        self.engine = Engine(None, cfg.engine)
        self.pool = ModelPool(self.engine, self._load_model, budget=resolve_budget(cfg.memory_budget, cfg.device),
                              estimate=self._estimate if self.model_factory is load_model else None)
        if self.pool.budget is not None:
            logger.info("memory budget for models: %.1f GB", self.pool.budget / 1e9)
        # Models first (the slow part, and the one that can fail); a station whose model fails is not started,
        # the others are. If no station can start, the daemon cannot do anything useful: that is fatal.
        errors: list[str] = []
        pool = self.pool
        for spec in dict.fromkeys(model_spec(cfg, sc) for sc in self.station_configs):
            try:
                self._unless_stopped(functools.partial(pool.load, spec))
            except ModelError as exc:
                errors.append(str(exc))
                users = [sc.path or sc.mount for sc in self.station_configs if model_spec(cfg, sc) == spec]
                logger.error("%s: %s; %s not started", ", ".join(users) or "default model", exc,
                             "these stations are" if len(users) > 1 else "the station is")
        if errors and not self.pool.models():
            raise ModelError(errors[0])
        if cfg.icecast.local:
            self._start_local_icecast()
        rng = random.Random(cfg.seed)
        for sc in self.station_configs:
            self._check_stop()
            if model_spec(cfg, sc) in self.pool.models():
                self.add_station(sc, rng)
            else:
                self._failed[sc.key] = sc
        self._check_stop()
        self.engine.start()
        for m in self.mounts.values():
            m.start()
        self.audience = Audience(self.config.icecast, self.engine.set_listeners)
        self.audience.start()
        base = self.config.icecast.listen_base
        for m in self.mounts.values():
            logger.info("listen: %s%s  (%s)", base, m.mount, m.station.config.name)
        if self.config.api.enabled:
            try:
                self.api = ApiServer(self.config.api, self.commands)
            except OSError as exc:
                raise RadioError(f"control API cannot listen on {self.config.api.host}:{self.config.api.port}: "
                                 f"{exc.strerror}; use --api HOST:PORT or --no-api") from exc
            self.api.start()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopping()

    def _unless_stopped(self, work: Callable[[], object]) -> object:
        """Run slow start-up work (a model load: seconds to minutes) on a helper thread, so that a SIGTERM
        meanwhile is answered at once: the process ends without waiting for it (the thread dies with it)."""
        self._check_stop()
        box: dict[str, object] = {}

        def target() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc

        worker = threading.Thread(target=target, name="startup", daemon=True)
        worker.start()
        while worker.is_alive():
            self._stop_or_reload.wait(0.1)
            self._check_stop()
        if "error" in box:
            raise box["error"]  # type: ignore[misc]
        return box.get("value")

    def _start_local_icecast(self) -> None:
        ic = self.config.icecast
        port = ic.port or 8000
        if port == 8000 and not port_is_free(port):
            port = free_port()
            logger.info("port 8000 is taken; local Icecast uses %d instead", port)
        self.local_icecast = LocalIcecast(template=find_icecast_xml(self.icecast_xml), port=port,
                                          source_password=ic.password or None,
                                          admin_password=ic.admin_password or None,
                                          min_sources=len(self.station_configs) + 8)
        self.local_icecast.start()
        self.config = replace(self.config, icecast=replace(ic, host="127.0.0.1", port=self.local_icecast.port,
                                                           user="source",
                                                           password=self.local_icecast.source_password,
                                                           admin_password=self.local_icecast.admin_password))

    def _load_model(self, spec: ModelSpec) -> MusicModel:
        return self.model_factory(replace(self.config, model=spec.name, dtype=spec.dtype,
                                          engine=replace(self.config.engine, weights=spec.weights)))

    def _estimate(self, spec: ModelSpec) -> int | None:
        return estimate_model_bytes(spec.name, spec.dtype, self.config.device, spec.weights)

    def add_station(self, sc: StationConfig, rng: random.Random | None = None) -> Station:
        """Start a station; its model is loaded first if no station uses it yet (raises ModelError)."""
        if self.pool is None or self.engine is None:
            raise RadioError("daemon not started")
        if len(self.stations) >= MAX_STATIONS:
            raise RadioError(f"{sc.path}: more than {MAX_STATIONS} stations; split them over several daemons")
        spec = model_spec(self.config, sc)
        try:
            model = self.pool.load(spec)
        except ModelError as exc:
            raise ModelError(f"{sc.path or sc.mount}: {exc}") from exc
        station = Station(sc, model.sample_rate, model.frame_rate, model.num_codebooks,
                          self.config.engine, rng=random.Random((rng or random.Random()).random()),
                          idents=load_idents(sc.idents, model.sample_rate, sc.mount, model.channels),
                          requests=self.config.requests, channels=model.channels)
        self.stations[station.key] = station
        self._failed.pop(sc.key, None)
        self.pool.add_station(station, spec)
        self.mounts[station.key] = Mount(station, self.config.icecast)
        return station

    # -- live edits -------------------------------------------------------------------------------------------
    def reload(self) -> None:
        """Re-read the stations directory and apply it file by file.

        A valid changed file is applied to its station only (a changed mount, format, bitrate or stream
        metadata restarts that one mount; prompts and sampling change without a restart). A new file starts a
        station, a removed file stops one. An invalid file is logged with file:line and its running version
        keeps playing.
        """
        self.files.mark()
        stations, problems = load_stations([self.config.stations_dir])
        bad = {line.split(":", 1)[0] for line in problems}
        for line in problems:
            running = line.split(":", 1)[0] in self.stations
            logger.error("%s (%s)", line, "the running version keeps playing" if running else "not started")
        wanted = {sc.key: sc for sc in stations}
        self.remove_stations([key for key in self.stations if key not in self.files and key not in bad])
        for key in list(self.stations):
            if self._stop.is_set():
                return
            if key in wanted and wanted[key] != self.stations[key].config:
                self.update_station(wanted[key])
        for key, sc in wanted.items():
            if self._stop.is_set():
                return  # the rest waits for the next start: a SIGTERM is answered now
            if key in self.stations or self._failed.get(key) == sc:
                continue  # running, or its model failed and the file has not changed since
            clash = [st for st in self.stations.values() if st.mount == sc.mount]
            if clash:
                logger.error("%s: mount: %s is already used by %s; not started", sc.path, sc.mount, clash[0].key)
                continue
            try:
                station = self.add_station(sc)
            except RadioError as exc:
                logger.error("%s; not started", exc)
                self._failed[key] = sc
                continue
            self.mounts[station.key].start()
            logger.info("%s: new station %r on %s", sc.path, sc.name, sc.mount)

    def update_station(self, sc: StationConfig) -> None:
        station = self.stations[sc.key]
        old = station.config
        if sc.mount != old.mount and any(st.mount == sc.mount for st in self.stations.values()):
            logger.error("%s: mount: %s is already used by another station; change not applied", sc.path, sc.mount)
            return
        idents = load_idents(sc.idents, station.sample_rate, sc.mount, station.channels) \
            if sc.idents != old.idents else None

        def apply(st: Station) -> None:
            st.apply_config(sc)
            if idents is not None:
                st.idents = idents

        if self.engine is not None:
            self.engine.post(sc.key, "edited station file", apply)
        spec = model_spec(self.config, sc)
        if spec != model_spec(self.config, old) and self.pool is not None:
            try:
                self.pool.change(sc.key, spec)
            except ModelError as exc:
                logger.error("%s", exc)
        stream = ("mount", "format", "bitrate", "name", "description", "genre", "url")
        on_air = self.mounts[sc.key].config  # what the mount runs with (the station's may still be pending)
        if any(getattr(sc, f) != getattr(on_air, f) for f in stream):
            logger.info("%s: stream settings changed; restarting %s", sc.path, sc.mount)
            self.mounts[sc.key].stop()
            self.mounts[sc.key] = Mount(station, self.config.icecast, config=sc)
            self.mounts[sc.key].start()
        else:
            logger.info("%s: applied", sc.path)

    def remove_station(self, key: str) -> None:
        self.remove_stations([key])

    def remove_stations(self, keys: list[str]) -> None:
        """Stop stations together: their mounts wind down in parallel (each flushes ffmpeg and closes its
        connection, about a second), so removing many files takes about as long as removing one."""
        if not keys:
            return
        stations = {key: self.stations.pop(key) for key in keys}
        self._stop_mounts([m for m in (self.mounts.pop(key, None) for key in keys) if m is not None],
                          time.monotonic() + self.stop_deadline)
        for key, station in stations.items():
            if self.pool is not None:
                self.pool.remove_station(key)
            logger.info("%s: file removed; %s stopped", key, station.mount)

    @staticmethod
    def _stop_mounts(mounts: list[Mount], deadline: float) -> None:
        threads = [threading.Thread(target=m.stop, args=(2.0,), daemon=True) for m in mounts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        """Reverse order: API -> mounts (ffmpeg, shout) -> engine -> local Icecast."""
        deadline = time.monotonic() + self.stop_deadline
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.audience is not None:
            self.audience.stop()
        self._stop_mounts(list(self.mounts.values()), deadline)
        if self.pool is not None:
            self.pool.stop()
        if self.engine is not None:
            # A step in flight holds nothing that must be closed: wait a little for it, never the whole deadline.
            self.engine.stop(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
        if self.local_icecast is not None:
            self.local_icecast.stop(timeout=max(0.5, deadline - time.monotonic()))  # then killed
            self.local_icecast.cleanup()
        logger.info("stopped")

    def request_stop(self, *_: object) -> None:
        """Signal handlers only set flags; the main loop does the work."""
        self._stop.set()
        self._stop_or_reload.set()

    def request_reload(self, *_: object) -> None:
        self._reload.set()
        self._stop_or_reload.set()

    def run(self, status_every: float = 60.0, watch_every: float = 1.0) -> None:
        """Start, serve until SIGINT/SIGTERM, stop. SIGHUP (or an edited station file) reloads stations.
        Exceptions propagate after everything is stopped."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        try:
            try:
                self.start()
            except _Stopping:
                logger.info("stop requested during start-up")
                return
            self.files.mark()
            next_status = time.monotonic() + status_every
            while not self._stop.is_set():
                self._stop_or_reload.wait(watch_every)
                self._stop_or_reload.clear()
                if self._stop.is_set():
                    break
                if self._reload.is_set():
                    self._reload.clear()
                    logger.info("SIGHUP: reloading %s", self.config.stations_dir)
                    self.reload()
                elif self.files.changed():
                    self.reload()
                if time.monotonic() >= next_status:
                    trim()  # give freed heap pages back: a daemon runs for weeks
                    self.log_status()
                    next_status += status_every
        finally:
            self.stop()

    # -- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Everything the API and the periodic log show; built from public methods only."""
        base = self.config.icecast.listen_base
        stations = []
        for key, st in list(self.stations.items()):
            mount = self.mounts.get(key)
            try:
                stations.append({
                    **st.status(), **(mount.status() if mount else {}),
                    **(self.pool.station_status(key) if self.pool else {}),
                    "pending": self.engine.pending(key) if self.engine else [],
                    "id": st.mount.lstrip("/"), "description": st.config.description, "genre": st.config.genre,
                    "listen_url": f"{base}{st.mount}",
                    "listeners": self.engine.listeners(st.mount) if self.engine else None,
                })
            except Exception as exc:  # noqa: BLE001 - one station's status must never fail the whole page
                logger.debug("%s: status failed", st.mount, exc_info=True)
                stations.append({"name": st.config.name, "mount": st.mount, "id": st.mount.lstrip("/"),
                                 "error": f"status unavailable: {type(exc).__name__}"})
        engine = self.engine.status() if self.engine else {}
        if self.audience is not None:
            engine["listeners_source"] = self.audience.source
            engine["listeners_error"] = self.audience.last_error
        return {"uptime_seconds": round(time.monotonic() - self.started, 1), "engine": engine,
                "models": self.pool.status() if self.pool else {}, "stations": stations}

    def log_status(self) -> None:
        for st in self.stations.values():
            s = st.status()
            logger.info("%s: buffered %.1fs, generated %.0fs, filled %.1fs, now %r", s["mount"],
                        s["buffered_seconds"], s["generated_seconds"], s["filled_seconds"], s["now_playing"])
