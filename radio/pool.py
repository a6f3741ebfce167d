"""Models by name and dtype: loaded once and shared, swapped live, unloaded when unused, within a budget.

Stations that name the same model (and dtype) share it, and so share its engine batch. Changing a running
station's model loads the new one on a background thread while the station plays on from the old one; the
engine then moves the station over at its next chunk, and the join is crossfaded. A model no station uses any
more is unloaded and its memory returned. When the new model does not fit the memory budget beside the old
one, and the old one is the changing station's alone, the old one is unloaded first and the station's filler
covers the gap. A model that fails to load leaves the station on its old model (reloaded if it had to make
room), and every other station untouched.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import DaemonConfig, StationConfig, parse_size
from .engine import Engine, ModelChange
from .errors import ModelError
from .musicgen.model import MusicModel
from .station.station import Station
from .status import Record, exported

logger = logging.getLogger(__name__)


def resolve_budget(text: str, device: str) -> int | None:
    """The memory budget in bytes. ``auto``: 90% of the GPU's memory on CUDA, else 80% of the RAM that is
    available now (other processes keep theirs)."""
    size = parse_size(text)
    if size != "auto":
        return size  # type: ignore[return-value]
    if device.startswith("cuda") or device == "auto":
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            return int(torch.cuda.get_device_properties(index).total_memory * 0.9)
    available = _mem_available()
    return int(available * 0.8) if available else None


def _mem_available() -> int | None:
    """MemAvailable (free memory plus what the page cache can give back), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def mb(n: int | None) -> str:
    return "unknown size" if n is None else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class ModelSpec:
    """Which model a station plays from: a hub id or checkpoint directory, and the decoder dtype."""

    name: str
    dtype: str = "auto"
    weights: str = "auto"

    @property
    def key(self) -> str:
        how = ", ".join(v for v in (self.dtype, self.weights) if v != "auto")
        return f"{self.name} ({how})" if how else self.name

    def __str__(self) -> str:
        return self.key


def model_spec(cfg: DaemonConfig, sc: StationConfig) -> ModelSpec:
    """A station's model: its own ``model:``/``dtype:``/``weights:``, else the daemon's."""
    return ModelSpec(sc.model or cfg.model, sc.dtype or cfg.dtype, sc.weights or cfg.engine.weights)


Loader = Callable[[ModelSpec], MusicModel]
Estimator = Callable[[ModelSpec], "int | None"]


@dataclass
class _Loaded:
    """A loaded model and the memory it took."""

    model: MusicModel
    nbytes: int


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


@dataclass
class ModelStatus(Record):
    """A loaded model in ``/status``: which, its stations, its memory, and how it runs (the model's own
    ``describe()``: device, decode path, weights, KV format, kernels... shown beside these fields)."""

    name: str
    dtype: str
    stations: list[str]
    memory_bytes: int = exported("radio_model_memory_bytes", "Memory held by a loaded model")
    batch_limit: int | None = exported("radio_model_batch_limit", "The most stations one batched step of a model "
                                       "takes (on a GPU: the decode slots that fit)")
    decode_state_bytes: int | None = exported("radio_model_decode_state_bytes", "Decode state (KV caches, slots) "
                                              "a model held after its last step")
    slots_used: int | None = exported("radio_model_slots_used", "Decode slots held by stations (GPU decode path)")
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        mine = super().to_dict()
        return {**mine.pop("details"), **mine}  # type: ignore[dict-item]


@dataclass
class PoolStatus(Record):
    """The models in ``/status``: every loaded one, the one loading, the memory budget and what is used."""

    models: list[dict[str, object]]
    loading: str | None
    memory_budget_bytes: int | None = exported("radio_model_memory_budget_bytes", "Memory budget for all models "
                                               "(0: none)")
    memory_used_bytes: int = exported("radio_model_memory_used_bytes", "Memory held by the loaded models")
    loads: int = exported("radio_model_loads", "Model loads (startup and live swaps)", counter=True)
    unloads: int = exported("radio_model_unloads", "Models unloaded because no station used them", counter=True)

class ModelPool:
    """Owns the loaded models: loads them (``load`` blocks: startup, new stations; ``change`` returns at once and
    loads in the background), shares them and unloads those no station uses. Which station plays from which is
    in the engine's record of each station (its model, and the pool's :class:`~radio.engine.ModelChange` while
    a change is under way); the pool reads and sets it through the engine's public methods."""

    def __init__(self, engine: Engine, loader: Loader, budget: int | None = None,
                 estimate: Estimator | None = None) -> None:
        self.engine = engine
        self.loader = loader
        self.budget = budget
        self.estimate: Estimator = estimate or (lambda spec: None)
        self.sample_rate: int | None = None  # every model of a daemon must make audio at one rate
        self.loads = 0
        self.unloads = 0
        self._lock = threading.RLock()
        self._models: dict[ModelSpec, _Loaded] = {}
        self._loading: ModelSpec | None = None
        self._jobs: queue.Queue[ModelSpec | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, spec: ModelSpec) -> MusicModel:
        """The model for ``spec``, loaded now if it is not yet (blocking). Raises ModelError."""
        with self._lock:
            if spec in self._models:
                return self._models[spec].model
            need = self.estimate(spec)
            used = self.used_bytes()
            if self.budget is not None and need is not None and used + need > self.budget:
                raise ModelError(f"model {spec} needs about {mb(need)}, but the memory budget is {mb(self.budget)} "
                                 f"and {mb(used)} is in use; raise memory_budget or use fewer models")
        return self._load(spec)

    def _load(self, spec: ModelSpec) -> MusicModel:
        self.loads += 1
        try:
            model = self.loader(spec)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - a loader bug must not take the daemon down either
            raise ModelError(f"could not load model {spec}: {exc}") from exc
        if self.sample_rate is not None and model.sample_rate != self.sample_rate:
            raise ModelError(f"model {spec} makes {model.sample_rate} Hz audio, but this daemon's stations run at "
                             f"{self.sample_rate} Hz; use a model with the same audio codec")
        loaded = _Loaded(model, int(model.memory_bytes()))
        with self._lock:
            self.sample_rate = self.sample_rate or model.sample_rate
            self._models[spec] = loaded
        self.engine.add_model(spec.key, model)
        logger.info("model %s ready (%s)", spec, mb(loaded.nbytes))
        return model

    # -- stations --------------------------------------------------------------------------------------------
    def add_station(self, station: Station, spec: ModelSpec) -> None:
        """Put a station on air on ``spec``, which must be loaded (``load``)."""
        with self._lock:
            if spec not in self._models:
                raise ModelError(f"model {spec} is not loaded")
        self.engine.add_station(station, spec.key)

    def remove_station(self, key: str) -> None:
        self.engine.remove_station(key)
        with self._lock:
            self._collect()

    def change(self, key: str, spec: ModelSpec) -> str:
        """Move a running station to ``spec``. Returns ``switched`` (it was loaded), ``loading`` (the station
        plays on from its old model meanwhile), ``loading-on-filler`` (the old model was unloaded to make
        room; filler covers) or ``unchanged``. Raises ModelError, changing nothing, when it cannot fit."""
        with self._lock:
            a = self.engine.model_change(key)
            if a is None:
                raise ModelError(f"{key}: no such station")
            current = self._spec_of(self.engine.model_of(key))
            a.error = None
            if spec == current:
                if a.wanted is not None:
                    a.wanted = a.restore = None
                    self._collect()
                return "unchanged"
            if spec in self._models:
                a.wanted = a.restore = None
                self._switch(key, spec)
                return "switched"
            mode = self._room_for(key, spec, current)
            a.wanted = spec
            if mode == "loading-on-filler" and current is not None:
                a.restore = current
                self._switch(key, None)  # the old model goes now; filler covers until the new one is in
            self._start_worker()
            self._jobs.put(spec)
            logger.info("%s: loading model %s in the background (%s)", key, spec,
                        "filler covers" if mode == "loading-on-filler" else f"{current} plays meanwhile")
            return mode

    def _wanted(self) -> set[ModelSpec]:
        return {a.wanted for _, a in self.engine.model_assignments().values() if a.wanted is not None}

    def _spec_of(self, model_key: str | None) -> ModelSpec | None:
        """The loaded model of this key (stations play only from loaded models)."""
        return next((s for s in self._models if s.key == model_key), None) if model_key is not None else None

    def _room_for(self, key: str, spec: ModelSpec, current: ModelSpec | None) -> str:
        need = self.estimate(spec)
        used = self.used_bytes()
        if self.budget is None or need is None or used + need <= self.budget:
            return "loading"
        others = {self._spec_of(m) for k, (m, _) in self.engine.model_assignments().items() if k != key}
        others |= self._wanted()
        loaded = self._models.get(current) if current is not None and current not in others else None
        freeable = loaded.nbytes if loaded is not None else 0
        if used - freeable + need <= self.budget:
            return "loading-on-filler"
        raise ModelError(f"{key}: model {spec} needs about {mb(need)}; the memory budget is {mb(self.budget)} with "
                         f"{mb(used)} in use by the models of running stations, so the station keeps {current}. "
                         "Raise memory_budget, or move other stations off their models first")

    def _switch(self, key: str, spec: ModelSpec | None) -> None:
        self.engine.set_station_model(key, spec.key if spec is not None else None)
        if spec is not None:
            logger.info("%s: now playing from model %s", key, spec)
        self._collect()

    def _collect(self) -> None:
        """Unload every model that no station plays from or waits for."""
        playing = {m for m, _ in self.engine.model_assignments().values()}
        in_use = {s for s in self._models if s.key in playing} | self._wanted()
        for spec in [s for s in self._models if s not in in_use]:
            loaded = self._models.pop(spec)
            self.engine.remove_model(spec.key)
            freed = loaded.nbytes
            del loaded
            self.unloads += 1
            logger.info("model %s unloaded: no station uses it (%s returned)", spec, mb(freed))
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- background loader -----------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="model-loader", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            spec = self._jobs.get()
            if spec is None:
                return
            with self._lock:
                if spec not in self._wanted():
                    continue  # changed again meanwhile
                loaded = self._models.get(spec)
            error = None
            if loaded is None:
                self._loading = spec
                try:
                    self._load(spec)
                except ModelError as exc:
                    error = str(exc)
                finally:
                    self._loading = None
            self._finish(spec, error)

    def _finish(self, spec: ModelSpec, error: str | None) -> None:
        with self._lock:
            for key, (model_key, a) in self.engine.model_assignments().items():
                if a.wanted != spec:
                    continue
                old, a.wanted, a.restore = a.restore, None, None
                if error is None:
                    self._switch(key, spec)
                    continue
                a.error = error
                keeps = old or self._spec_of(model_key)
                logger.error("%s: model %s could not be loaded: %s; the station keeps %s", key, spec, error, keeps)
                if old is not None:  # it made room for the new one: bring it back, filler covers meanwhile
                    a.wanted = old
                    self._jobs.put(old)
            self._collect()

    def stop(self) -> None:
        self._jobs.put(None)

    def wait_idle(self, timeout: float) -> bool:
        """Tests and shutdown: True once no load is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._wanted() and self._loading is None:
                    return True
            time.sleep(0.05)
        return False

    # -- status ----------------------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        with self._lock:
            return sum(loaded.nbytes for loaded in self._models.values())

    def station_status(self, key: str) -> dict[str, object]:
        with self._lock:
            current = self._spec_of(self.engine.model_of(key))
            a = self.engine.model_change(key) or ModelChange()
            return {"model": current.name if current else None,  # None: on filler until model_loading is in
                    "model_dtype": current.dtype if current else None,
                    "model_loading": a.wanted.name if a.wanted else None,
                    "model_error": a.error}

    def status(self) -> dict[str, object]:
        """The pool's :class:`PoolStatus` (with a :class:`ModelStatus` per loaded model), as JSON."""
        with self._lock:
            users: dict[str | None, list[str]] = {}
            for k, (model_key, _) in self.engine.model_assignments().items():
                users.setdefault(model_key, []).append(k)
            models = []
            for s, loaded in self._models.items():
                how = self._describe(loaded.model)
                models.append(ModelStatus(
                    name=s.name, dtype=s.dtype, stations=sorted(users.get(s.key, [])), memory_bytes=loaded.nbytes,
                    batch_limit=_int(how.get("batch_limit")), decode_state_bytes=_int(how.get("decode_state_bytes")),
                    slots_used=_int(how.get("slots_used")), details=dict(how)).to_dict())
            return PoolStatus(models=models, loading=self._loading.key if self._loading else None,
                              memory_budget_bytes=self.budget, memory_used_bytes=self.used_bytes(),
                              loads=self.loads, unloads=self.unloads).to_dict()

    @staticmethod
    def _describe(model: MusicModel) -> dict[str, str | int | None]:
        try:
            return model.describe()
        except Exception as exc:  # noqa: BLE001 - a status read must never fail on one model
            return {"describe_error": f"{type(exc).__name__}: {exc}"[:200]}

    def models(self) -> dict[ModelSpec, MusicModel]:
        with self._lock:
            return {spec: loaded.model for spec, loaded in self._models.items()}
