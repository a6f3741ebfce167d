"""The control API's commands to stations: a one-off prompt, a skip, a model change, listener requests.

Each command finds its station by mount and hands the change to the engine thread (:meth:`Commands._command`),
answering at once: applied, or pending until the running step ends. The daemon owns the stations; this part
only acts on them through their public methods.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Protocol

from ..config import DaemonConfig
from ..engine import Engine
from ..errors import RadioError
from ..musicgen.model import model_source
from ..pool import ModelPool, ModelSpec, model_spec
from ..station.station import Station

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What the commands need of the daemon that owns the stations."""

    config: DaemonConfig
    stations: dict[str, Station]
    pool: ModelPool | None
    engine: Engine | None

    def status(self) -> dict[str, Any]: ...

    def request_reload(self, *_: object) -> None: ...


class Commands:
    """What the API may ask of the daemon (``api.Controller``)."""

    def __init__(self, daemon: Host) -> None:
        self.daemon = daemon

    def status(self) -> dict[str, Any]:
        return self.daemon.status()

    def request_reload(self) -> None:
        self.daemon.request_reload()

    def _station(self, station_id: str) -> Station | None:
        mount = "/" + station_id.strip("/")
        return next((st for st in self.daemon.stations.values() if st.mount == mount), None)

    def _station_status(self, station: Station) -> dict[str, object]:
        return next(s for s in self.daemon.status()["stations"] if s["mount"] == station.mount)

    def set_prompt(self, station_id: str, prompt: str, title: str | None, duration: float | None,
                   blend: float) -> dict[str, object] | None:
        station = self._station(station_id)
        if station is None:
            return None
        label = title or prompt[:80]
        return self._command(station, f"prompt {label!r}",
                             lambda st: st.play_now(prompt, title, duration, blend))

    def set_model(self, station_id: str, model: str, dtype: str | None) -> dict[str, object] | None:
        """Move a station to another model (control API). Loads in the background; raises ModelError when
        the model cannot be used at all (no such directory, does not fit the memory budget)."""
        station = self._station(station_id)
        if station is None or self.daemon.pool is None:
            return None
        source = model_source(model)  # a missing or config-less directory is refused here, at once
        if Path(source).is_dir():
            model = str(Path(source).resolve())
        current = model_spec(self.daemon.config, station.config)
        spec = ModelSpec(model, dtype or current.dtype, current.weights)
        result = self.daemon.pool.change(station.key, spec)
        return {**self._station_status(station), "change": result}

    # -- listener requests (public: no token; each station's queue bounds itself) -------------------------------
    def _requesting(self, station_id: str) -> Station | None:
        station = self._station(station_id)
        return station if station is not None and station.requests.enabled else None

    def request(self, station_id: str, prompt: object, name: object, client: str) -> dict[str, object] | None:
        """Queue a listener's request (raises RequestRefused); None when the station takes none."""
        station = self._requesting(station_id)
        if station is None:
            return None
        request, position = station.requests.submit(prompt, name, client)
        logger.info("%s: request queued at %d: %r", station.mount, position, request.prompt[:80])
        return {"request": {**request.public(), "position": position,
                            "plays_in_seconds": round(station.request_wait(position))},
                "queue": self.requests(station_id)}

    def requests(self, station_id: str) -> dict[str, object] | None:
        station = self._requesting(station_id)
        if station is None:
            return None
        cfg = station.requests.config
        waiting = [{**r.public(), "position": i, "plays_in_seconds": round(station.request_wait(i))}
                   for i, r in enumerate(station.requests.waiting(), 1)]
        playing = station.requesting.public() if station.requesting is not None else None
        return {"mount": station.mount, "playing": playing, "waiting": waiting,
                "limits": {"every_seconds": cfg.every, "queue": cfg.queue, "duration_seconds": cfg.duration,
                           "share": cfg.share}}

    def remove_request(self, station_id: str, request_id: str) -> dict[str, object] | None:
        """The operator takes a request out of the queue; None when there is no such station or request."""
        station = self._requesting(station_id)
        if station is None or station.requests.remove(request_id) is None:
            return None
        logger.info("%s: request %s removed by the operator", station.mount, request_id)
        return self.requests(station_id)

    def skip(self, station_id: str) -> dict[str, object] | None:
        station = self._station(station_id)
        if station is None:
            return None
        return self._command(station, "skip", lambda st: st.skip())

    COMMAND_WAIT = 0.08  # an API call answers within 100 ms: applied, or accepted as pending (the engine applies
    # changes between steps, and a step takes seconds on a slow CPU)

    def _command(self, station: Station, what: str, action: Callable[[Station], object]) -> dict[str, object]:
        """Hand a change to the engine thread and answer at once: with the station's status once it is applied,
        or (when a step is running) with the change shown as pending and about when it applies."""
        if self.daemon.engine is None:
            raise RadioError("daemon not started")
        command = self.daemon.engine.post(station.key, what, action)
        command.wait(self.COMMAND_WAIT)
        if command.error is not None and command.done.is_set():
            raise RadioError(f"{station.mount}: {what} failed: {command.error}")
        status = self._station_status(station)
        if not command.done.is_set():
            status["accepted"] = {"pending": what, "applies_in_seconds": round(self.daemon.engine.step_remaining(), 2),
                                  "applies": "when the model's running step ends (the station's next chunk)"}
        return status
