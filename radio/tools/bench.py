"""``radio bench``: how fast the engine turns decode steps into audio, against honest baselines.

Scenarios, each at several mount counts (one text prompt per mount, guidance 3, sampling on):

* ``prototype``: the loop this project replaced, reimplemented as it ran: every step re-encodes the last 4 s of
  waveform per mount through the processor and EnCodec, re-runs the text encoder, generates 100 new tokens
  with ``generate`` and decodes prompt + new audio. fp32.
* ``generate``: raw ``model.generate`` of the same number of new frames from text only: the ceiling for a
  design that calls ``generate`` per chunk (no context at all).
* ``ours``: ``MusicgenModel.continue_batch`` in steady state (every mount with about 20 s of cached context,
  KV caches live, window resets charged at their long-run rate), in fp32 and in the ``auto`` dtype.

Figures: aggregate audio seconds per wall second, wall seconds per decode step, time to first audio of a new
station joining the batch, peak RSS; then the ratios the engine is held to. Random-weight checkpoints have the
real shapes, so the timings are the real ones (``radio make-test-model --shape small``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from ..config import Sampling
from ..musicgen.model import ContinuationRequest, MusicgenModel, cache_keyword, resolve_device, resolve_dtype
from ..musicgen.resident import resident_bytes
from ..native import trim

logger = logging.getLogger(__name__)

PROMPTS = [
    "lofi hip hop, rainy night piano, soft vinyl crackle",
    "deep ambient drone, slow evolving synth pads",
    "smooth jazz trio, upright bass, brushed drums",
    "upbeat funk, slap bass, bright horns",
    "epic cinematic strings, big drums",
    "retro 80s synthwave, gated drums",
    "acoustic guitar folk, warm and mellow",
    "minimal techno, deep kick, hypnotic",
]
SAMPLING = Sampling(temperature=1.0, top_k=250, guidance=3.0)


@dataclass
class Result:
    scenario: str
    dtype: str
    mounts: int
    audio_per_wall: float  # aggregate audio seconds per wall second
    seconds_per_step: float  # wall seconds per decoder step (batched)
    ttfa_seconds: float | None  # time to first audio of a new station joining the batch
    peak_rss_mb: float
    reset_seconds: float | None = None  # extra wall time of a chunk in which one station's window resets
    realtime_per_mount: float = 0.0  # audio seconds per wall second for each mount (>= 1.0: real time)
    state_bytes_per_mount: int = 0  # decode state (KV caches / slots) per mount
    peak_device_mb: float = 0.0  # peak device memory allocated (CUDA)
    # seconds per steady chunk: steps (on the static path split into layers, sampling, noise and other), encodec,
    # prefill, resets_charged
    breakdown: dict[str, float] | None = None
    step_anatomy: dict[str, float] | None = None  # static path: seconds per step (SlotDecoder.anatomy)
    weights: str = "dense"  # how the decoder's linear weights are held: dense (the dtype), int8, int4
    kv: str = "full"  # how the dynamic path's KV cache is held: full (the dtype) or 8bit
    compiled: bool = False  # the CPU step's layer compiled (musicgen/compiled.py)
    layer_loop: bool = False  # the CPU step's layers as one call of radio's kernels (musicgen/native/layers.py)
    codec: str = "float32"  # EnCodec's dtype (musicgen/codec.py)
    kernels: str = "torch"  # the CPU kernels of quantized weights and an 8-bit cache: torch, or radio's (native)


class RssSampler:
    """Peak resident set size over a block (ru_maxrss cannot be reset, so sample /proc)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        now = resident_bytes()
        if now is not None:
            return now
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self) -> "RssSampler":
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "python": platform.python_version()}


def _text_inputs(model: MusicgenModel, prompts: list[str]) -> dict[str, Any]:
    return {k: v.to(model.device) for k, v in model.tokenizer(prompts, padding=True, return_tensors="pt").items()}


def _sync(model: MusicgenModel) -> None:
    """Wait for the device: a clock read must not run ahead of queued kernels."""
    import torch

    if str(model.device).startswith("cuda"):
        torch.cuda.synchronize()


def _device_peak_mb(model: MusicgenModel, reset: bool = False) -> float:
    import torch

    if not str(model.device).startswith("cuda"):
        return 0.0
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated() / 2**20


def bench_prototype(model: MusicgenModel, mounts: int, steps: int, progress: Callable[[str], None]) -> Result:
    """The prototype's loop: waveform re-prompt through the processor, 100 tokens, decode prompt + new."""
    import torch
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model.name)
    sr = model.sample_rate
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(mounts)]
    audio: list[np.ndarray] | None = None
    produced = 0.0
    wall = 0.0
    with RssSampler() as rss:
        for i in range(steps + 1):  # the first (text-only) round is warm-up
            t0 = time.monotonic()
            inputs = processor(audio=audio, text=prompts, padding=True, sampling_rate=sr, return_tensors="pt")
            if audio is not None:
                inputs["input_values"] = inputs["input_values"].to(torch.float32)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            with torch.inference_mode():
                out = model.model.generate(**inputs, max_new_tokens=100, do_sample=True, guidance_scale=3.0,
                                           top_k=250)
            start = audio[0].shape[0] if audio is not None else 0
            new = out[:, 0, start:].float().cpu().numpy()
            audio = [out[b, 0, -4 * sr:].float().cpu().numpy() for b in range(mounts)]
            dt = time.monotonic() - t0
            if i > 0:
                produced += mounts * new.shape[1] / sr
                wall += dt
            progress(f"prototype x{mounts}: round {i}/{steps} {dt:.1f}s")
    return Result("prototype", "float32", mounts, produced / wall, wall / (steps * 100), None, rss.peak / 2**20)


def bench_generate(model: MusicgenModel, mounts: int, frames: int, progress: Callable[[str], None]) -> Result:
    import torch

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(mounts)]
    inputs = _text_inputs(model, prompts)
    # Our decoder runs in the chosen dtype while the text encoder and EnCodec stay fp32; autocast lets the
    # stock generate() run across that mix (a no-op for fp32).
    autocast = torch.autocast(device_type="cuda" if str(model.device).startswith("cuda") else "cpu",
                              dtype=model.dtype, enabled=model.dtype != torch.float32)
    with RssSampler() as rss, torch.inference_mode(), autocast:
        model.model.generate(**inputs, max_new_tokens=8, do_sample=True, guidance_scale=3.0)  # warm-up
        _sync(model)
        t0 = time.monotonic()
        model.model.generate(**inputs, max_new_tokens=frames + model.num_codebooks - 1, do_sample=True,
                             guidance_scale=3.0, top_k=250)
        _sync(model)
        wall = time.monotonic() - t0
    progress(f"generate x{mounts}: {wall:.1f}s")
    steps = frames + model.num_codebooks - 1
    return Result("generate", _dtype_name(model), mounts, mounts * frames / model.frame_rate / wall, wall / steps,
                  None, rss.peak / 2**20)


def raw_decode_step(model: MusicgenModel, mounts: int, context: int, repeats: int = 5, bare: bool = False) -> float:
    """Seconds for one bare transformers decoder forward: 2 rows per mount (guidance), one new token, over
    ``context`` cached tokens (random KV: the cost does not depend on the values).

    ``bare=False``: transformers' DynamicCache, as ``generate`` runs a step (its update concatenates, copying the
    cache). ``bare=True``: a preallocated cache written in place, nothing but the forward itself: the floor of a
    step of this batch on this machine, whatever an engine does around it."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

    class BufferLayer(DynamicLayer):
        """A self-attention cache layer over a preallocated buffer: ``update`` writes in place.

        Attention is given the WHOLE buffer, not a slice of its first ``length`` columns: a slice of a longer
        buffer is not contiguous, and CPU matmuls (bf16 above all) copy such an operand on every call, which made
        the copy of the entire KV cache the biggest cost of a decode step. The columns past ``length`` are zeros
        (finite) and masked out (``get_mask_sizes`` reports the full width; the causal mask hides the future).
        The decode loop sizes the buffer to the chunk (``DecodeState.fit``), so few such columns are attended.
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
            super().__init__()
            self.buf_k = keys
            self.buf_v = values
            self.length = length
            self.is_initialized = True
            self.dtype, self.device = keys.dtype, keys.device

        @property  # type: ignore[override]
        def keys(self) -> torch.Tensor:
            return self.buf_k

        @keys.setter
        def keys(self, value: torch.Tensor) -> None:  # DynamicLayer.__init__ assigns; the buffer is the truth
            pass

        @property  # type: ignore[override]
        def values(self) -> torch.Tensor:
            return self.buf_v

        @values.setter
        def values(self, value: torch.Tensor) -> None:
            pass

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            n = key_states.shape[-2]
            end = self.length + n
            if end > self.buf_k.shape[2]:
                raise RuntimeError(f"KV buffer full ({self.buf_k.shape[2]} columns)")
            self.buf_k[:, :, self.length:end] = key_states
            self.buf_v[:, :, self.length:end] = value_states
            self.length = end
            return self.buf_k, self.buf_v

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.buf_k.shape[2], 0

    rows = 2 * mounts
    K = model.num_codebooks
    dec = model.model.decoder
    keyword = cache_keyword(dec)
    cfg = dec.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    columns = context + (1 if bare else 0)
    kv = [(torch.randn(rows, heads, columns, head_dim, dtype=model.dtype, device=model.device),
           torch.randn(rows, heads, columns, head_dim, dtype=model.dtype, device=model.device))
          for _ in range(cfg.num_hidden_layers)]
    enc = torch.zeros((rows, 12, cfg.hidden_size), dtype=model.dtype, device=model.device)
    step = torch.randint(0, model.vocab_size, (rows * K, 1), device=model.device)
    if bare:
        layers = [BufferLayer(k, v, context) for k, v in kv]
        self_attn = DynamicCache()
        self_attn.layers = layers  # type: ignore[assignment]
        cache = EncoderDecoderCache(self_attn, DynamicCache())
    else:
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=kv), DynamicCache())

    def forward() -> None:
        if bare:
            for layer in layers:
                layer.length = context  # the same column, written again
        dec(input_ids=step, encoder_hidden_states=enc, use_cache=True, **{keyword: cache})

    with torch.inference_mode():
        forward()  # warm-up (and the cross-attention cache)
        _sync(model)
        t0 = time.monotonic()
        for _ in range(repeats):
            forward()
        _sync(model)
        return (time.monotonic() - t0) / repeats


@contextmanager
def resets_held(model: MusicgenModel) -> Iterator[None]:
    """Window resets held off while steady chunks are measured (a reset's cost is measured on its own and charged
    at the rate the engine meets it): the window as long as the positions allow, no resets ahead of need."""
    path = model.decode_path
    window = model.window_frames
    model.window_frames = model.max_positions - 8
    path.spread_resets = False
    try:
        yield
    finally:
        model.window_frames = window
        path.spread_resets = True


def reset_slot_limit(model: MusicgenModel) -> None:
    """After an out-of-memory probe, let the slots grow again to what free memory allows."""
    if model.slots is not None:
        model.slots.max_slots = model.slots.slots_that_fit()


def bench_ours(model: MusicgenModel, mounts: int, frames: int, chunks: int, first_frames: int,
               progress: Callable[[str], None], context_seconds: float = 10.0) -> Result:
    """Our engine's steady state, with window resets counted at their long-run rate.

    Steady chunks are measured with resets held off, at an average cached context of 2 x ``context_seconds``
    (the middle of a station's cycle from ``context_seconds`` up to the 3 x window). One chunk with as many
    forced resets as a steady chunk has (each station resets once per (window - context) seconds of audio,
    and a chunk's resets are prefilled together) then gives their cost, which is charged to every chunk.
    ``audio_per_wall`` includes that charge.
    """
    rng = np.random.default_rng(0)
    fps = model.frame_rate
    context_frames = int(context_seconds * fps)
    window_frames = model.window_frames
    # Measured chunks span [start + frames, start + (chunks + 1) x frames]: centre them on 2 x context.
    start_frames = max(context_frames, 2 * context_frames - (chunks + 2) * frames // 2)
    # ...but every chunk of the run (warm-up, measured, the reset and the join) must fit the window, or the
    # 'reset' chunk would re-prefill every mount at once: start earlier (less context) when it would not.
    start_frames = max(1, min(start_frames, model.window_frames - (chunks + 2) * frames - 2 * model.num_codebooks))
    ctx = {f"m{i}": rng.integers(0, model.vocab_size, (model.num_codebooks, start_frames)) for i in range(mounts)}

    def step(keys: list[str], n: int) -> float:
        reqs = [ContinuationRequest(ctx[k][:, -start_frames:], PROMPTS[int(k[1:]) % len(PROMPTS)], SAMPLING,
                                    overlap=10, key=k) for k in keys]
        _sync(model)
        t0 = time.monotonic()
        res = model.continue_batch(reqs, n)
        _sync(model)
        dt = time.monotonic() - t0
        for k, r in zip(keys, res):
            ctx[k] = np.concatenate([ctx[k], r.codes], axis=1)[:, -context_frames:]
        return dt

    keys = list(ctx)
    # Hold resets off while the steady chunks are measured (a reset's cost is measured and charged below).
    _device_peak_mb(model, reset=True)
    with resets_held(model):
        with RssSampler() as rss:
            progress(f"ours x{mounts} ({_dtype_name(model)}): warm-up (prefill of {start_frames} frames per mount)")
            step(keys, frames)  # prefill + warm-up (a CUDA graph is captured here for this batch's bucket)
            wall, steps, audio = 0.0, 0, 0.0
            parts = {"encodec": 0.0, "prefill": 0.0}
            for c in range(chunks):
                dt = step(keys, frames)
                wall += dt
                steps += model.last_steps
                audio += mounts * frames / fps
                parts["encodec"] += model.last_decode_seconds
                parts["prefill"] += model.last_prefill_seconds
                progress(f"ours x{mounts} ({_dtype_name(model)}): chunk {c + 1}/{chunks} {dt:.2f}s")
            state_bytes = model.decode_state_bytes_per_station(mounts)
            anatomy = model.slots.anatomy() if model.slots is not None else None
            # Window resets, as the engine meets them: each station resets once per (window - context) of
            # audio, so a steady batch has about `resets_per_chunk` of them in every chunk, prefilled together.
            # That many stations' contexts (context_seconds of codes) are prefilled again while the others go on.
            resets_per_chunk = mounts * frames / max(1, window_frames - context_frames)
            resetting = list(ctx)[:max(1, min(mounts, round(resets_per_chunk)))]
            for k in resetting:
                ctx[k] = ctx[k][:, -context_frames:].copy()
                ctx[k][:, -1] = (ctx[k][:, -1] + 1) % model.vocab_size  # not what the cache holds: re-prefill
            # Their cost: the prefill, timed on its own (the difference of two chunk timings was as noisy as the
            # machine), and the warm-up steps fresh rows add to the chunk.
            step(keys, frames)
            # The warm-up steps run for the whole batch, but they are not lost on the others (each gets as many
            # more frames): what the resets cost is the prefill and the fresh rows' share of them.
            reset = (model.last_prefill_seconds + (model.last_steps - frames) * wall / steps * len(resetting) / mounts
                     ) / len(resetting)
            # A new station: as the engine schedules it, its first short chunk runs on its own (the running
            # stations sit that step out, their caches parked) and then it joins the batch.
            ctx["m99"] = np.zeros((model.num_codebooks, 0), np.int64)
            ttfa = step(["m99"], first_frames)
            step(keys + ["m99"], first_frames)  # the join (the others' caches come back from parking)
            model.forget("m99")
            del ctx["m99"]
    charged = wall + chunks * resets_per_chunk * reset
    stepping = (wall - parts["encodec"] - parts["prefill"]) / chunks
    breakdown = {"steps": stepping}
    if anatomy:  # the steps' time split: what the device does in a step, and what is left (Python, launches...)
        per_chunk = steps / chunks
        breakdown.update(layers=(anatomy["step"] - anatomy["sampling"]) * per_chunk,
                         sampling=anatomy["sampling"] * per_chunk, noise=anatomy["noise"] * per_chunk,
                         other=stepping - (anatomy["step"] + anatomy["noise"]) * per_chunk)
    breakdown.update(encodec=parts["encodec"] / chunks, prefill=parts["prefill"] / chunks,
                     resets_charged=resets_per_chunk * reset)
    breakdown = {k: round(v, 4) for k, v in breakdown.items()}
    return Result("ours", _dtype_name(model), mounts, audio / charged, wall / steps, ttfa, rss.peak / 2**20,
                  weights=getattr(model, "weights", "dense"), kv=getattr(model, "kv", "full"),
                  compiled=bool(getattr(model, "compile", False)), codec=_codec(model),
                  layer_loop=bool(getattr(model, "layer_loop", False)),
                  kernels="native" if getattr(model, "native_in_use", False) else "torch",
                  reset_seconds=reset, realtime_per_mount=audio / charged / mounts, state_bytes_per_mount=state_bytes,
                  peak_device_mb=_device_peak_mb(model), breakdown=breakdown, step_anatomy=anatomy)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (from /proc; 0 for one that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def descendants(pid: int) -> dict[int, str]:
    """Live descendant processes of ``pid``: pid -> command name."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1:text.rindex(")")]
            parents[int(entry)] = (int(text.rsplit(")", 1)[1].split()[1]), name)
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, (parent, name) in parents.items():
            if parent == p and child not in found:
                found[child] = name
                todo.append(child)
    return found


def _bench_stations(directory: Path, count: int) -> list[Any]:
    """``count`` station files (formats mp3, vorbis, opus in turn) in ``directory``, loaded."""
    from ..config import load_stations

    formats = ("mp3", "vorbis", "opus")
    for i in range(count):
        fmt = formats[i % 3]
        (directory / f"s{i:03d}.yaml").write_text(
            f"name: S{i}\nmount: /s{i}.{ {'mp3': 'mp3', 'vorbis': 'ogg', 'opus': 'opus'}[fmt] }\nformat: {fmt}\n"
            f"playlist:\n  - {{title: T{i}, prompt: calm piano, duration: 10m}}\n")
    stations, problems = load_stations([directory])
    if problems:
        raise RuntimeError(problems[0])
    return stations


def _cpu_split(seconds: float) -> tuple[float, float, float, float]:
    """Cores used over ``seconds`` by this process, its ffmpeg encoders and its Icecast (and the wall time)."""
    me = os.getpid()
    kids = descendants(me)
    enc = [p for p, name in kids.items() if name == "ffmpeg"]
    ice = [p for p, name in kids.items() if name.startswith("icecast")]
    t0, a0, e0, i0 = time.monotonic(), _cpu_seconds([me]), _cpu_seconds(enc), _cpu_seconds(ice)
    time.sleep(seconds)
    wall = time.monotonic() - t0
    return ((_cpu_seconds([me]) - a0) / wall, (_cpu_seconds(enc) - e0) / wall, (_cpu_seconds(ice) - i0) / wall,
            wall)


def bench_outputs(mounts: int, seconds: float, progress: Callable[[str], None], idle: bool = False) -> dict[str, Any]:
    """What the output side costs per mount: a real daemon with ``mounts`` stations (formats mp3, vorbis, opus in
    turn, loudness normalisation on, as the defaults are), real ffmpeg encoders, libshout and a local Icecast,
    fed by a model that makes audio instantly. Returns CPU cores used by the daemon process, its encoders and
    Icecast, and those per 100 mounts. ``idle``: nobody listens (engine.generate: listened, no linger), so every
    mount loops its own audio with no encoder running: what an idle mount costs."""
    import tempfile

    from ..config import DaemonConfig, EngineConfig, IcecastConfig, ApiConfig
    from ..daemon import Daemon
    from ..output.local import free_port
    from .testing import SineModel

    with tempfile.TemporaryDirectory() as tmp:
        st = Path(tmp) / "stations"
        st.mkdir()
        stations = _bench_stations(st, mounts)

        def instant(_cfg: DaemonConfig) -> SineModel:
            model = SineModel()
            model.batch_limit = 512
            return model

        engine = EngineConfig(generate="listened", linger=0.0) if idle else EngineConfig(generate="always")
        cfg = DaemonConfig(stations_dir=str(st), memory_budget="off", icecast=IcecastConfig(local=True, port=free_port()),
                           engine=engine, api=ApiConfig(enabled=False))
        daemon = Daemon(cfg, stations, model_factory=instant)
        daemon.start()
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(m.output.stats.connected for m in daemon.mounts.values()):
                time.sleep(0.5)
            deadline = time.monotonic() + 60
            while idle and time.monotonic() < deadline and any(m.encoder.processes for m in daemon.mounts.values()):
                time.sleep(0.5)
            time.sleep(5.0)  # warm-up: buffers filled, every encoder (or idle loop) running
            encoders = sum(m.encoder.processes for m in daemon.mounts.values())
            progress(f"outputs x{mounts}{' idle' if idle else ''}: measuring {seconds:.0f}s ({encoders} encoders)")
            daemon_cores, enc_cores, ice_cores, wall = _cpu_split(seconds)
            filled = sum(s.filled_samples for s in daemon.stations.values()) / 32000
            idle_mounts = sum(1 for s in daemon.stations.values() if s.idle)
        finally:
            daemon.stop()
    total = daemon_cores + enc_cores + ice_cores
    return {"mounts": mounts, "idle": idle, "idle_mounts": idle_mounts, "encoders": encoders,
            "seconds": round(wall, 1), "daemon_cores": round(daemon_cores, 3),
            "encoder_cores": round(enc_cores, 3), "icecast_cores": round(ice_cores, 3),
            "total_cores": round(total, 3), "cores_per_100_mounts": round(100 * total / mounts, 2),
            "filled_seconds": round(filled, 1)}


def _wake_latency(daemon: Any, base: str, mount: str) -> dict[str, float | None]:
    """A listener tunes in to an idle mount: seconds until its station generates again (the audience poll)
    and until the mount's fresh encoder takes over from the idle loop (the first fresh bytes to Icecast)."""
    import subprocess

    station = next(s for s in daemon.stations.values() if s.mount == mount)
    encoder = daemon.mounts[station.key].encoder
    deadline = time.monotonic() + 30
    while not station.idle and time.monotonic() < deadline:
        time.sleep(0.1)
    t0 = time.monotonic()
    ear = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "quiet", "-i", f"{base}{mount}", "-t", "20", "-f",
                            "null", "-"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    woke = live = None
    try:
        while time.monotonic() < t0 + 20 and live is None:
            if woke is None and not station.idle:
                woke = time.monotonic() - t0
            if encoder.live_since is not None and encoder.live_since > t0:
                live = encoder.live_since - t0
            time.sleep(0.01)
    finally:
        ear.kill()
        ear.wait()
    return {"wake_seconds": None if woke is None else round(woke, 3),
            "first_fresh_bytes_seconds": None if live is None else round(live, 3)}


def bench_audience(model_dir: str, stations: int, listened: int, seconds: float,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    """Where model time goes with many stations and few listeners: a real daemon (the given model on this
    machine's device, local Icecast, real encoders) with ``stations`` stations, ``listened`` of them with a real
    listener (ffmpeg decoding the mount). Returns the audio generated per listened and per idle station, the
    batch sizes and the engine's real-time factor over ``seconds``."""
    import subprocess
    import tempfile

    from ..config import ApiConfig, DaemonConfig, EngineConfig, IcecastConfig
    from ..daemon import Daemon
    from ..output.local import free_port

    with tempfile.TemporaryDirectory() as tmp:
        st = Path(tmp) / "stations"
        st.mkdir()
        configs = _bench_stations(st, stations)
        cfg = DaemonConfig(stations_dir=str(st), model=model_dir, memory_budget="off", seed=0,
                           icecast=IcecastConfig(local=True, port=free_port()), api=ApiConfig(enabled=False),
                           engine=EngineConfig(generate="listened", linger=5.0))
        daemon = Daemon(cfg, configs)
        daemon.start()
        ears: list[subprocess.Popen[bytes]] = []
        try:
            base = daemon.config.icecast.listen_base
            by_mount = {s.mount: s for s in daemon.stations.values()}
            heard = sorted(by_mount)[:listened]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not all(m.output.stats.connected for m in daemon.mounts.values()):
                time.sleep(0.5)
            for mount in heard:
                ears.append(subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "quiet", "-i", f"{base}{mount}",
                                              "-f", "null", "-"], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
            time.sleep(10.0)  # the linger of the unheard ones runs out; the heard ones woke
            engine = daemon.engine
            if engine is None:
                raise RuntimeError("the daemon did not start its engine")
            before = {m: s.generated_samples for m, s in by_mount.items()}
            steps0 = engine.steps
            progress(f"audience: {stations} stations, {listened} listened: measuring {seconds:.0f}s")
            daemon_cores, enc_cores, ice_cores, wall = _cpu_split(seconds)
            made = {m: (s.generated_samples - before[m]) / s.sample_rate for m, s in by_mount.items()}
            steps = engine.steps - steps0
            batch = engine.last_batch
            while_generating = engine.realtime_factor
            unheard = [m for m in sorted(by_mount) if m not in heard]
            wake = _wake_latency(daemon, base, unheard[-1]) if unheard else {}
        finally:
            for ear in ears:
                ear.kill()
                ear.wait()
            daemon.stop()
            if daemon.engine is not None:
                daemon.engine.join(300)  # a step in flight ends before torch is torn down with the process
    on = [made[m] / wall for m in heard]
    off = [v / wall for m, v in made.items() if m not in heard]
    return {"stations": stations, "listened": listened, "seconds": round(wall, 1), "steps": steps, **wake,
            "last_batch_size": len(batch),
            # audio per wall second while a step runs (the last 32 steps): chunk-sized, so finer than the above
            "engine_realtime_factor": round(while_generating, 3),
            "realtime_per_listened_station": round(sum(on) / max(1, len(on)), 3),
            "realtime_per_idle_station": round(sum(off) / max(1, len(off)), 3),
            "cores": round(daemon_cores + enc_cores + ice_cores, 3)}


def _codec(model: MusicgenModel) -> str:
    codec = getattr(model, "codec", None)
    return str(getattr(codec, "dtype", "float32"))


def _dtype_name(model: MusicgenModel) -> str:
    """The model's decoder dtype, its weights where they are quantized, its KV cache where it is 8-bit, whether
    its step's layer is compiled (or its layers run as radio's loop), whether EnCodec runs in bf16 and whether
    radio's own CPU kernels serve the quantized weights or 8-bit cache: ``bfloat16+int8``, ``bfloat16+int4+kv8``,
    ``bfloat16+int4+kv8+compiled+encodec-bf16+native``, ``bfloat16+int8+kv8+loop+encodec-bf16+native``."""
    weights = getattr(model, "weights", "dense")
    native = getattr(model, "native_in_use", False)
    return (str(model.dtype).replace("torch.", "") + (f"+{weights}" if weights in ("int8", "int4") else "")
            + ("+kv8" if getattr(model, "kv", "full") == "8bit" else "")
            + ("+compiled" if getattr(model, "compile", False) else "")
            + ("+loop" if getattr(model, "layer_loop", False) else "")
            + ("+encodec-bf16" if _codec(model) == "bfloat16" else "") + ("+native" if native else ""))


def run_bench(model_dir: str, mounts: list[int], frames: int = 100, chunks: int = 3, proto_steps: int = 2,
              first_seconds: float = 1.0, dtypes: tuple[str, ...] = ("float32", "auto"), context_seconds: float = 10.0,
              scenarios: tuple[str, ...] = ("prototype", "generate", "ours"), capacity: bool = False,
              decoder: str = "auto", weights_list: tuple[str, ...] = ("auto",), quality: bool = False,
              kv_list: tuple[str, ...] = ("auto",), compile_list: tuple[str, ...] = ("auto",),
              codec_list: tuple[str, ...] = ("auto",), kernels_list: tuple[str, ...] = ("auto",),
              progress: Callable[[str], None] = lambda m: logger.info("%s", m)) -> dict[str, Any]:
    """Run every scenario and return the report (also what ``--json`` writes)."""
    results: list[Result] = []
    raw_steps: dict[str, float] = {}
    bare_steps: dict[str, float] = {}
    window_seconds = max(3 * context_seconds, context_seconds + 2 * frames / 50 + 1)
    kernels: dict[str, str] = {}
    loaded_rss: dict[str, float] = {}  # MB resident right after each model's load (the ones before it freed)
    capacities: dict[str, int] = {}
    wanted: list[str] = []
    for dtype in dtypes:  # "auto" may resolve to a dtype already listed
        name = str(resolve_dtype(dtype, resolve_device("auto"))).replace("torch.", "")
        if name not in wanted:
            wanted.append(name)
    for dtype in wanted:
        # The baselines run on transformers' stock layers, as anyone would run them; ours (and the bare decoder
        # step it is held to) on the model as the engine loads it, with packed linear layers where available.
        # One model in memory at a time.
        if "prototype" in scenarios or "generate" in scenarios:
            stock = MusicgenModel(model_dir, device="auto", dtype=dtype, seed=0, fast_kernels=False, kv="full",
                                  kernels="torch")
            for n in mounts:
                # the prototype re-prompts with mono audio: it has no stereo loop to compare with
                if "prototype" in scenarios and _dtype_name(stock) == "float32" and stock.channels == 1:
                    results.append(bench_prototype(stock, n, proto_steps, progress))
                if "generate" in scenarios:
                    results.append(bench_generate(stock, n, frames, progress))
            del stock
        settings = [(w, k, c, e, n) for w in weights_list for k in kv_list for c in compile_list for e in codec_list
                    for n in kernels_list]
        for weights, kv, compile, codec, native in settings if "ours" in scenarios else ():
            _free()
            # the engine's window: a station's cache cycles from context_seconds up to 3 x context_seconds (and
            # at least context + 2 chunks, as the engine's config demands)
            m = MusicgenModel(model_dir, device="auto", dtype=dtype, seed=0, window_seconds=window_seconds,
                              decoder=decoder, weights=weights, kv=kv, compile=compile, codec=codec,
                              kernels=native)
            name = _dtype_name(m)
            if name in kernels:
                del m
                continue  # another weights setting resolved to one already measured
            loaded_rss[name] = (resident_bytes() or 0) / 2**20
            kernels[name] = str(m.describe()["kernels"]) + f", {m.decoder} decoder" + (
                f", {m.slots.kernels} kernels" if m.slots is not None else "") + (
                f", EnCodec bf16 ({m.codec.snr_db:.1f} dB SNR against float32)" if m.codec.dtype == "bfloat16"
                and m.codec.snr_db is not None else "")
            first_frames = max(1, int(first_seconds * m.frame_rate))
            cuda = str(m.device).startswith("cuda")
            for n in mounts:
                results.append(bench_ours(m, n, frames, chunks, first_frames, progress, context_seconds))
                if cuda and n > 16:
                    continue  # the reference steps' own caches would not fit beside the slots
                cached = int(2 * context_seconds * m.frame_rate) + frames
                raw_steps[f"{name}:{n}"] = raw_decode_step(m, n, cached)
                bare_steps[f"{name}:{n}"] = raw_decode_step(m, n, cached, bare=True)
            if capacity and dtype == wanted[-1]:
                measure = functools.partial(bench_ours, m, frames=frames, chunks=chunks, first_frames=first_frames,
                                            progress=progress, context_seconds=context_seconds)
                capacities[name] = find_capacity(m, [r for r in results if r.scenario == "ours" and r.dtype == name],
                                                 lambda n: measure(n), results)
            del m
    outputs = [bench_outputs(n, 30.0, progress) for n in mounts] if "outputs" in scenarios else []
    outputs += [bench_outputs(n, 30.0, progress, idle=True) for n in mounts] if "idle" in scenarios else []
    # many stations, few listened; and one station, listened, as the rate to compare the listened ones with
    audience = ([bench_audience(model_dir, 1, 1, 60.0, progress),
                 bench_audience(model_dir, max(mounts), max(1, max(mounts) // 8), 60.0, progress)]
                if "audience" in scenarios and max(mounts) > 1 else [])
    qualities = weight_quality(model_dir, tuple(w for w in weights_list if w in ("int8", "int4")) or ("int8", "int4"),
                               progress=progress) if quality else {}
    if quality and "8bit" in kv_list:
        qualities["kv8"] = kv_quality(model_dir, progress=progress)
    if quality and "always" in compile_list:
        qualities["compiled"] = compile_quality(model_dir, progress=progress)
    if quality and "auto" in kernels_list and "torch" in kernels_list:
        for w in tuple(w for w in weights_list if w in ("int8", "int4")) or ("int8", "int4"):
            qualities[f"{w}-native"] = kernels_quality(model_dir, w, progress=progress)
    if quality and "auto" in kernels_list and "auto" in compile_list and "always" in compile_list:
        for w in tuple(w for w in weights_list if w in ("int8", "int4")) or ("int8", "int4"):
            qualities[f"{w}-loop"] = loop_quality(model_dir, w, progress=progress)
    report = {"date": time.strftime("%Y-%m-%d"), "model": model_dir, "machine": machine_info(), "outputs": outputs,
              "weight_quality": qualities,
              "audience": audience,
              "settings": {"frames_per_chunk": frames, "chunks": chunks, "guidance": SAMPLING.guidance,
                           "context_seconds": context_seconds, "window_seconds": window_seconds,
                           "top_k": SAMPLING.top_k, "first_chunk_seconds": first_seconds,
                           "ours_linear_kernels": kernels},
              "loaded_rss_mb": loaded_rss,
              "results": [asdict(r) for r in results], "raw_decode_step_seconds": raw_steps,
              "bare_decode_step_seconds": bare_steps, "capacity_mounts": capacities}
    report["ratios"] = ratios(results, raw_steps, first_seconds, bare_steps)
    return report


def _free() -> None:
    """Let the models measured before go (they hold reference cycles) and hand their pages back, so that a
    model's RSS after loading is its own (and the process's)."""
    import gc

    gc.collect()
    trim()


def weight_quality(model_dir: str, weights: tuple[str, ...], frames: int = 300,
                   progress: Callable[[str], None] = lambda m: None) -> dict[str, dict[str, float]]:
    """How far quantized weights move the decoder from the same checkpoint with dense bf16 weights: over
    ``frames`` frames of the dense model's own greedy continuation (guidance 3), the relative error of every
    step's logits (teacher-forced on those codes, conditional rows) and how often their top-1 agrees; and the
    share of greedy codes that come out the same when each model continues the same context itself."""
    import torch

    from ..musicgen.model import ContinuationRequest

    greedy = replace(SAMPLING, temperature=0.0, top_k=1)
    prompt = "warm lofi piano with soft drums"
    dense = MusicgenModel(model_dir, device="cpu", weights="bfloat16", kv="full", seed=0)
    rng = np.random.default_rng(0)
    context = rng.integers(0, dense.vocab_size, (dense.num_codebooks, 50))
    request = [ContinuationRequest(context, prompt, greedy, key="q")]
    want_codes = dense.continue_batch(request, frames)[0].codes
    ids = torch.as_tensor(want_codes[:, :frames])

    def logits(m: MusicgenModel) -> Any:
        with torch.inference_mode():
            states = m.encode_text(prompt)[None].to(m.dtype)
            return m.model.decoder(input_ids=ids, encoder_hidden_states=states).logits.float()

    reference = logits(dense)
    del dense
    out: dict[str, dict[str, float]] = {}
    for w in weights:
        progress(f"quality: {w} weights over {frames} frames")
        m = MusicgenModel(model_dir, device="cpu", weights=w, kv="full", seed=0)
        got = logits(m)
        codes = m.continue_batch(request, frames)[0].codes
        n = min(codes.shape[1], want_codes.shape[1])
        out[w] = {"logits_rel_error": round(float((got - reference).norm() / reference.norm()), 4),
                  "top1_agreement": round(float((got.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
                  "greedy_code_agreement": round(float((codes[:, :n] == want_codes[:, :n]).mean()), 4),
                  "frames": frames}
        del m
    return out


def kv_quality(model_dir: str, frames: int = 200,
               progress: Callable[[str], None] = lambda m: None) -> dict[str, float]:
    """How far an 8-bit KV cache moves the dynamic path's logits from the full (bf16) cache (both with dense bf16
    weights and eager layers): :func:`path_quality`."""
    progress(f"quality: 8bit KV cache over {frames} frames")
    return path_quality(model_dir, {"kv": "full", "compile": "never"}, {"kv": "8bit", "compile": "never"}, frames)


def kernels_quality(model_dir: str, weights: str, frames: int = 200,
                    progress: Callable[[str], None] = lambda m: None) -> dict[str, float]:
    """How far radio's CPU kernels (activations rounded to int8 per row) move the dynamic path's logits from
    PyTorch's weight-only kernels, with the same quantized ``weights`` (full cache, eager layers):
    :func:`path_quality`."""
    progress(f"quality: {weights} weights on radio's kernels over {frames} frames")
    return path_quality(model_dir, {"weights": weights, "kv": "full", "compile": "never", "kernels": "torch"},
                        {"weights": weights, "kv": "full", "compile": "never", "kernels": "auto"}, frames)


def loop_quality(model_dir: str, weights: str, frames: int = 200,
                 progress: Callable[[str], None] = lambda m: None) -> dict[str, float]:
    """How far radio's layer loop (float32 between the products) moves the dynamic path's logits from the compiled
    layers (bf16 between the ops), with the same quantized ``weights`` on radio's kernels and the 8-bit cache:
    :func:`path_quality`. (Where the loop cannot serve, both are the compiled layers.)"""
    progress(f"quality: {weights} weights, radio's layer loop over {frames} frames")
    return path_quality(model_dir, {"weights": weights, "kv": "8bit", "compile": "always"},
                        {"weights": weights, "kv": "8bit", "compile": "auto"}, frames)


def compile_quality(model_dir: str, frames: int = 200,
                    progress: Callable[[str], None] = lambda m: None) -> dict[str, float]:
    """How far the compiled layer moves the dynamic path's logits from the eager one (dense bf16 weights, full
    cache): :func:`path_quality`."""
    progress(f"quality: compiled layers over {frames} frames")
    return path_quality(model_dir, {"kv": "full", "compile": "never"}, {"kv": "full", "compile": "always"}, frames)


def path_quality(model_dir: str, reference: dict[str, Any], candidate: dict[str, Any],
                 frames: int = 200) -> dict[str, float]:
    """The dynamic path with the ``candidate`` settings against the ``reference`` ones (MusicgenModel keywords;
    dense bf16 weights unless they say otherwise): teacher-forced over ``frames`` frames of the reference's own greedy continuation
    (guidance 3), the conditional rows' logits' relative error and top-1 agreement; and the share of greedy codes
    that come out the same when each continues the same context itself."""
    greedy = replace(SAMPLING, temperature=0.0, top_k=1)
    full = MusicgenModel(model_dir, device="cpu", seed=0, decoder="dynamic", **{"weights": "bfloat16", **reference})
    other = MusicgenModel(model_dir, device="cpu", seed=0, decoder="dynamic", **{"weights": "bfloat16", **candidate})
    context = np.random.default_rng(0).integers(0, full.vocab_size, (full.num_codebooks, 250))
    request = ContinuationRequest(context, "warm lofi piano with soft drums", greedy, key="q")
    want_codes = full.continue_batch([request], frames)[0].codes[:, :frames]
    got_codes = other.continue_batch([request], frames)[0].codes[:, :frames]
    from ..musicgen.dynamic import DynamicDecoder

    want, got = (m.decode_path.teacher_forced_logits(request, want_codes) for m in (full, other)
                 if isinstance(m.decode_path, DynamicDecoder))
    return {"logits_rel_error": round(float((got - want).norm() / want.norm()), 4),
            "top1_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4),
            "greedy_code_agreement": round(float((got_codes == want_codes).mean()), 4), "frames": frames}


def find_capacity(model: MusicgenModel, measured: list[Result], run: Callable[[int], Result],
                  results: list[Result], limit: int = 512) -> int:
    """The most mounts that each stay at or above real time (resets and EnCodec charged): from the mount counts
    already measured, doubling past the largest that held, then bisecting to within ~5 %."""
    ok = [r.mounts for r in measured if r.realtime_per_mount >= 1.0]
    bad = [r.mounts for r in measured if r.realtime_per_mount < 1.0]
    lo, hi = max(ok, default=0), min((b for b in bad if b > max(ok, default=0)), default=None)
    while hi is None and lo < limit:
        n = min(limit, max(1, lo * 2))
        try:
            r = run(n)
        except Exception as exc:  # noqa: BLE001 - out of slots or memory: the bound is below n
            logger.info("capacity: %d mounts failed: %s", n, exc)
            reset_slot_limit(model)
            hi = n
            break
        results.append(r)
        if r.realtime_per_mount >= 1.0:
            lo = n
        else:
            hi = n
    while hi is not None and hi - lo > max(2, lo // 20):
        n = (lo + hi) // 2
        try:
            r = run(n)
            results.append(r)
            good = r.realtime_per_mount >= 1.0
        except Exception as exc:  # noqa: BLE001
            logger.info("capacity: %d mounts failed: %s", n, exc)
            reset_slot_limit(model)
            good = False
        lo, hi = (n, hi) if good else (lo, n)
    return lo


def _find(results: list[Result], scenario: str, dtype: str | None, mounts: int) -> Result | None:
    for r in results:
        if r.scenario == scenario and r.mounts == mounts and (dtype is None or r.dtype == dtype):
            return r
    return None


def ratios(results: list[Result], raw_steps: dict[str, float], first_seconds: float,
           bare_steps: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mounts = sorted({r.mounts for r in results})
    ref = 3 if 3 in mounts else (mounts[len(mounts) // 2] if mounts else 0)
    proto = _find(results, "prototype", "float32", ref)
    dtypes = sorted({r.dtype for r in results if r.scenario == "ours"})
    for dtype in dtypes:
        ours = _find(results, "ours", dtype, ref)
        if proto and ours:
            out[f"ours_{dtype}_vs_prototype_at_{ref}_mounts"] = round(ours.audio_per_wall / proto.audio_per_wall, 2)
        for n in mounts:
            o = _find(results, "ours", dtype, n)
            raw = raw_steps.get(f"{dtype}:{n}")
            if o and raw:
                out[f"step_overhead_{dtype}_{n}_mounts"] = round(o.seconds_per_step / raw, 3)
            if o and raw and o.ttfa_seconds is not None:
                budget = (first_seconds * 50 + 3) * raw + 2.0
                out[f"ttfa_{dtype}_{n}_mounts_vs_budget"] = f"{o.ttfa_seconds:.2f}s / {budget:.2f}s"
        one, four = _find(results, "ours", dtype, 1), _find(results, "ours", dtype, 4)
        if one and four:
            out[f"batching_efficiency_{dtype}_4_vs_1"] = round(four.audio_per_wall / (4 * one.audio_per_wall), 3)
        # The same ratio for the bare decoder forward alone (no engine, no audio decoding): how much batching
        # this machine gives at this context, the bound for any engine. Each mount adds its own KV cache to
        # read per step; only the weights are shared.
        bare1, bare4 = bare_steps.get(f"{dtype}:1"), bare_steps.get(f"{dtype}:4")
        if bare1 and bare4:
            out[f"batching_efficiency_bare_forward_{dtype}_4_vs_1"] = round(bare1 / bare4, 3)
    return out


def format_table(report: dict[str, Any]) -> str:
    width = max([9, *(len(r["dtype"]) for r in report["results"])])
    lines = [f"radio bench  {report['date']}  model={report['model']}",
             f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
             f"{report['machine']['torch']}",
             "",
             f"{'scenario':<10} {'dtype':<{width}} {'mounts':>6} {'audio s/s':>10} {'x/mount':>8} {'ms/step':>8} "
             f"{'ttfa s':>7} {'reset s':>8} {'RSS MB':>8} {'MB/mount':>9} {'dev MB':>8}  time per chunk"]
    for r in report["results"]:
        ttfa = f"{r['ttfa_seconds']:.2f}" if r["ttfa_seconds"] is not None else "-"
        reset = f"{r['reset_seconds']:.2f}" if r.get("reset_seconds") is not None else "-"
        per = r.get("realtime_per_mount") or r["audio_per_wall"] / r["mounts"]
        state = f"{r.get('state_bytes_per_mount', 0) / 2**20:.0f}" if r.get("state_bytes_per_mount") else "-"
        dev = f"{r.get('peak_device_mb', 0):.0f}" if r.get("peak_device_mb") else "-"
        where = _where(r.get("breakdown") or {})
        lines.append(f"{r['scenario']:<10} {r['dtype']:<{width}} {r['mounts']:>6} {r['audio_per_wall']:>10.3f} "
                     f"{per:>8.2f} {1000 * r['seconds_per_step']:>8.1f} {ttfa:>7} {reset:>8} "
                     f"{r['peak_rss_mb']:>8.0f} {state:>9} {dev:>8}  {where}")
    for o in report.get("outputs", []):
        lines.append(f"outputs    {o['mounts']:>4} {'idle ' if o.get('idle') else ''}mounts: "
                     f"daemon {o['daemon_cores']:.2f} + encoders {o['encoder_cores']:.2f}"
                     f" + icecast {o['icecast_cores']:.2f} = {o['total_cores']:.2f} cores "
                     f"({o['cores_per_100_mounts']:.1f} per 100 mounts; {o['filled_seconds']:.1f} s filled)")
    for w, q in report.get("weight_quality", {}).items():
        what = {"kv8": "8bit KV cache vs full", "compiled": "compiled layers vs eager"}.get(w, f"{w} weights vs bf16")
        if w.endswith("-native"):
            what = f"{w[:-7]} weights, radio's kernels vs PyTorch's"
        if w.endswith("-loop"):
            what = f"{w[:-5]} weights, radio's layer loop vs compiled layers"
        lines.append(f"quality    {what} over {q['frames']} frames: logits error "
                     f"{q['logits_rel_error']:.4f}, top-1 agreement {q['top1_agreement']:.3f}, "
                     f"greedy codes agreement {q['greedy_code_agreement']:.3f}")
    for a in report.get("audience", []):
        lines.append(f"audience   {a['stations']} stations, {a['listened']} listened: each listened one "
                     f"{a['realtime_per_listened_station']:.2f}x real time, each idle one "
                     f"{a['realtime_per_idle_station']:.2f}x (engine while generating "
                     f"{a['engine_realtime_factor']:.2f}); {a['steps']} steps, last batch {a['last_batch_size']}, "
                     f"{a['cores']:.2f} cores" + (f"; a listener on an idle mount: station awake after "
                                                   f"{a['wake_seconds']} s, fresh bytes after "
                                                   f"{a['first_fresh_bytes_seconds']} s" if "wake_seconds" in a else ""))
    for name, mb in report.get("loaded_rss_mb", {}).items():
        lines.append(f"resident   {name}: {mb:.0f} MB RSS right after loading")
    lines.append("")
    for k, v in report.get("capacity_mounts", {}).items():
        lines.append(f"capacity ({k}): {v} mounts each at >= 1.0x real time")
    for k, v in report["ratios"].items():
        lines.append(f"{k:<50} {v}")
    return "\n".join(lines)


STEP_PARTS = ("layers", "sampling", "noise", "other")  # what "steps" splits into on the static path


def _where(breakdown: dict[str, float]) -> str:
    """A chunk's time, its steps' parts in brackets: ``steps=2.315 (layers=... other=...) encodec=...``."""
    inner = " ".join(f"{k}={breakdown[k]:.3f}" for k in STEP_PARTS if k in breakdown)
    outer = [f"{k}={v:.3f}" + (f" ({inner})" if k == "steps" and inner else "")
             for k, v in breakdown.items() if k not in STEP_PARTS]
    return " ".join(outer)


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
