"""MusicGen behind a small interface: load, encode text (cached), continue many streams in one batch.

The engine talks to :class:`MusicModel` only. :class:`MusicgenModel` is the real one (Hugging Face
transformers, loaded with ``from_pretrained`` from a hub id or a local checkpoint directory); tests may put a
fake with the same methods behind the engine.

How a continuation step works (see ``MusicgenModel.continue_batch``):

* Each request carries its station's recent audio as MusicGen codes, shape ``(codebooks, frames)``, 50 frames
  per second. The codes are laid out in MusicGen's *delay pattern* (codebook k lags k+1 positions behind a
  BOS column) and fed to the decoder as input ids, so no waveform is ever re-encoded through EnCodec.
* All requests share one decoder batch. Classifier-free guidance doubles the rows (conditional rows first,
  then unconditional rows with zeroed text states, as transformers does). Guidance scale, temperature and
  top-k are applied per row, so stations with different sampling settings share the same forward passes.
* Rows with shorter contexts are left-padded and masked, so new stations join a batch of old ones.
* Only the new frames, plus ``overlap`` frames of context for the join, go through the EnCodec decoder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from ..config import DECODERS, DEFAULT_MODEL, DTYPES, Sampling
from ..errors import ConditioningError, ModelError

from .pattern import DelayPattern

if TYPE_CHECKING:
    from .codec import Codec
    from .plan import ChunkPlan
    from .text import TextConditioning
    from .slots import SlotDecoder

logger = logging.getLogger(__name__)
ANON = "\0anon"  # key prefix of requests without a station key: their rows are never kept across calls

DEVICES_HELP = "auto, cpu, cuda or cuda:N"


@dataclass
class ContinuationRequest:
    """One station's share of a batched step.

    ``context``: int64 codes ``(codebooks, frames)``; may have 0 frames for a brand-new station.
    ``overlap``: how many of the last context frames to decode again in front of the new audio, so the
    engine can crossfade the join. ``prompt``: text conditioning.
    """

    context: np.ndarray
    prompt: str
    sampling: Sampling = field(default_factory=Sampling)
    overlap: int = 0
    key: str = ""  # the station; a model may keep per-station state (KV cache) under it
    blend_from: str | None = None  # during a prompt blend: the previous prompt...
    blend: float = 1.0  # ...and the weight of the new one (0 = old prompt only, 1 = new prompt only)

    @property
    def decoded_overlap(self) -> int:
        """The overlap frames actually decoded: never more than the context has."""
        return min(self.overlap, self.context.shape[1])


@dataclass
class ContinuationResult:
    """New codes ``(codebooks, n)`` and float32 mono PCM for ``overlap + n`` frames.

    ``n`` is at least the frames asked for; rows that continue from a live cache while another row warms up
    may get a few more (the warm-up steps are not wasted on them)."""

    codes: np.ndarray
    pcm: np.ndarray
    overlap: int
    fresh: bool = True  # the station's context was (re)prefilled for this chunk (new, reset, or changed)


class MusicModel(Protocol):
    """What the engine needs from a music model."""

    sample_rate: int
    frame_rate: int
    num_codebooks: int
    samples_per_frame: int
    channels: int  # 1: PCM (samples,); 2: PCM (samples, 2)

    @property
    def batch_limit(self) -> int:
        """The most stations one continue_batch call should carry."""
        ...

    vocab_size: int  # codes are in [0, vocab_size): with the three above, whether two models share a code format

    def continue_batch(self, requests: Sequence[ContinuationRequest], frames: int) -> list[ContinuationResult]:
        """Generate ``frames`` new frames for every request in ONE batched pass. Raises
        :class:`~radio.errors.ConditioningError` (naming the request's key) before generating anything when one
        request's conditioning cannot be computed."""
        ...

    def forget(self, key: str) -> None:
        """Drop whatever the model keeps for the station ``key`` (it has left, or moved to another model)."""
        ...

    def memory_bytes(self) -> int:
        """Bytes the model holds (weights and decode state), for the pool's memory budget."""
        ...

    def describe(self) -> dict[str, str | int | None]:
        """How the model runs, for ``/status`` and ``/metrics``: ``device``, ``decoder`` (its decode path),
        ``kernels``, ``batch_limit``, ``decode_state_bytes`` (after the last chunk), and on the static path
        ``slots_used`` and ``slot_bytes`` (else None). Cheap, and safe to call from any thread."""
        ...


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (avx512_bf16 or AMX), where bf16 is a real speed-up."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelError(f"unknown device {device!r}: use {DEVICES_HELP}")
    return device


def resolve_decoder(decoder: str, device: str) -> str:
    """The decode path: ``static`` (fixed KV slots, the step captured as a CUDA graph) on CUDA, ``dynamic``
    (chunk-sized contiguous KV buffers, measured fastest on small CPUs) elsewhere; either may be forced."""
    if decoder not in DECODERS:
        raise ModelError(f"unknown decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if decoder != "auto":
        return decoder
    return "static" if device.startswith("cuda") else "dynamic"


def resolve_dtype(dtype: str, device: str):  # -> torch.dtype
    """The dtype policy: ``auto`` is bf16 where the hardware has it, fp16 on CUDA without bf16, else fp32."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def resolve_weights(weights: str, device: str, dtype: Any) -> str:
    """The weight policy: ``int8``/``int4`` (weight-only, CPU), or ``dense`` (the decoder's dtype). ``auto`` on a CPU
    with bf16 picks int8: half the bytes a decode step reads, for logits within about 3 % of the dense bf16 model's
    (see the README's quality table); 4-bit weights are there to choose. Everywhere else ``auto`` is dense."""
    import torch

    from .kernels import WEIGHTS, quantization_works

    if weights not in WEIGHTS:
        raise ModelError(f"unknown weights {weights!r}: use one of {', '.join(WEIGHTS)}")
    if weights in ("int8", "int4"):
        if device != "cpu":
            raise ModelError(f"{weights} weights are a CPU feature; on {device} use weights: auto")
        if not quantization_works(8 if weights == "int8" else 4):
            logger.warning("this PyTorch has no working %s weight-only kernels; the weights stay dense", weights)
            return "dense"
        return weights
    if weights == "auto" and device == "cpu" and dtype == torch.bfloat16 and quantization_works(8):
        return "int8"
    return "dense"


def model_source(name: str) -> str:
    """A local checkpoint directory (checked) or a hub id, as ``from_pretrained`` will be given it."""
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelError(f"model directory {local} has no config.json; point it at a MusicGen checkpoint")
        return str(local)
    if name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"model directory {local} does not exist")
    return name


def estimate_model_bytes(name: str, dtype: str = "auto", device: str = "cpu") -> int | None:
    """Memory a checkpoint will take once loaded (weights in the dtype policy: decoder in ``dtype``, text
    encoder and EnCodec in fp32), read from its config alone by building the model on the meta device.
    None when the config cannot be read (the load itself will then report why)."""
    import torch
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration

    try:
        config = MusicgenConfig.from_pretrained(model_source(name))
        with torch.device("meta"):
            skeleton = MusicgenForConditionalGeneration(config)
        size = torch.tensor([], dtype=resolve_dtype(dtype, resolve_device(device))).element_size()
    except Exception as exc:  # noqa: BLE001 - an estimate is optional; the load reports real errors
        logger.debug("no size estimate for %s: %s", name, exc)
        return None
    total = sum(p.numel() for p in skeleton.parameters())
    decoder = sum(p.numel() for p in skeleton.decoder.parameters())
    buffers = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    return decoder * size + (total - decoder) * 4 + buffers


def cache_keyword(module) -> str:
    """The name a transformers forward takes the KV cache by: ``cache`` since transformers renamed it (5.2x),
    ``past_key_values`` before (the old name is removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(output):  # -> transformers Cache
    """The KV cache a transformers forward returned, under either of its names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class _RowPositions:
    """Per-row position ids for MusicGen's sinusoidal positions (transformers' module has none).

    A row left-padded by ``off`` tokens must still see its BOS at position 0, as in training; without this,
    a new station batched next to an old one would start at the old one's position. Installed in place of
    ``embed_positions``; ``position_ids`` (rows, seq) is set before each decoder call.
    """

    def __init__(self, original) -> None:  # original: MusicgenSinusoidalPositionalEmbedding
        self.original = original
        self.position_ids: Any = None  # torch.Tensor (rows, seq) while a call of ours runs

    def __call__(self, input_ids, cache_length: int = 0):
        if self.position_ids is None:
            return self.original(input_ids, cache_length)
        weights = self.original.weights
        return weights[self.position_ids.clamp(min=0, max=weights.shape[0] - 1)]


class MusicgenModel:
    """A MusicGen checkpoint loaded with ``from_pretrained``, continued in batches.

    Not thread-safe by design: the engine thread is its only caller.
    """

    def __init__(self, name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int | None = None,
                 text_cache_size: int = 256, window_frames: int | None = None,
                 window_seconds: float = 30.0, fast_kernels: bool = True, decoder: str = "auto",
                 weights: str = "auto") -> None:
        import torch
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        self.name = name
        self.device = resolve_device(device)
        if weights in ("float32", "bfloat16"):
            dtype = weights  # dense weights in that dtype: the decoder runs in it
        self.dtype = resolve_dtype(dtype, self.device)
        self.weights = resolve_weights(weights, self.device, self.dtype)
        if self.weights in ("int8", "int4"):
            self.dtype = torch.bfloat16  # the weight-only kernels take bf16 activations
        source = model_source(name)
        logger.info("loading model %s on %s (%s)", source, self.device, str(self.dtype).replace("torch.", ""))
        try:
            # Eager attention: a decode step has ONE query per row, where the CPU SDPA kernels spend most of
            # their time on setup (measured with radio bench: bf16 step at 550 cached tokens 0.20 s -> 0.17 s).
            # Any: transformers types its sub-configs loosely (dict | config | None)
            model: Any = MusicgenForConditionalGeneration.from_pretrained(source, attn_implementation="eager")
            processor = AutoProcessor.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - OSError: unknown id, offline with nothing cached, missing
            # files; safetensors/ValueError/RuntimeError: a corrupt directory (unreadable weights, a config of
            # another architecture, tensors of the wrong shape). All mean the same to the operator.
            raise ModelError(
                f"could not load model {name!r}: {str(exc).strip().splitlines()[0][:300]}. Use a hub id such as "
                f"{DEFAULT_MODEL} (needs network on first use) or a local MusicGen checkpoint directory"
            ) from exc
        channels = int(getattr(model.config.decoder, "audio_channels", 1) or 1)
        if channels not in (1, 2) or model.decoder.num_codebooks % channels:
            raise ModelError(f"model {name!r} has {channels} audio channels over {model.decoder.num_codebooks} "
                             "codebooks; MusicGen checkpoints are mono (1) or stereo (2)")
        model.eval().to(self.device)
        self._torch = torch
        self.model: Any = model
        self._set_decoder_dtype(self.dtype)
        inner = model.decoder.model.decoder
        self._positions = _RowPositions(inner.embed_positions)
        # Plain attribute, not a submodule: keeps state_dict and .to() of the real module untouched.
        object.__setattr__(inner, "embed_positions", self._positions)
        self._cache_kw = cache_keyword(model.decoder)
        self.tokenizer = processor.tokenizer
        audio_cfg = model.config.audio_encoder
        self.sample_rate = int(audio_cfg.sampling_rate)
        self.frame_rate = int(audio_cfg.frame_rate)
        self.samples_per_frame = self.sample_rate // self.frame_rate
        self.num_codebooks = int(model.decoder.num_codebooks)
        self.channels = channels  # PCM comes back (samples,) for mono, (samples, 2) for stereo
        self.pattern = DelayPattern(self.num_codebooks, channels)
        self.pad_id = int(model.generation_config.pad_token_id
                          if model.generation_config.pad_token_id is not None else model.config.decoder.pad_token_id)
        self.vocab_size = int(model.config.decoder.vocab_size)
        self.max_positions = int(model.config.decoder.max_position_embeddings)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        from .codec import Codec  # torch-heavy, like the rest: imported only when a real model is loaded
        from .text import TextConditioning

        self.text: TextConditioning = TextConditioning(model, self.tokenizer, self.device, self.dtype,
                                                       text_cache_size)
        self._lock = threading.Lock()
        self.calls = 0  # batched continuation calls so far (status and tests)
        self.last_batch_size = 0
        self.last_steps = 0
        self.last_prefill_seconds = 0.0  # wall time of the last chunk's prefill (bench: a reset's cost)
        self.last_decode_seconds = 0.0  # wall time of the last chunk's EnCodec decoding
        self.codec: Codec = Codec(model.audio_encoder, self.channels, self.samples_per_frame, self.device)
        self.state_bytes = 0  # decode state held after the last chunk (describe(): read without the lock)
        self._window_kept: int | None = None  # window_frames while the bench holds resets off
        self.spread_resets = True  # window resets one per chunk, ahead of need (see plan.resets_due)
        self.resets = 0
        # Frames a row may hold before it is reset: MusicGen was trained on 30 s windows.
        self.window_frames = min(window_frames or int(window_seconds * self.frame_rate), self.max_positions - 8)
        from .decoding import DecodeState  # torch-heavy: imported only when a real model is used

        dcfg = model.config.decoder
        self._state = DecodeState(num_layers=dcfg.num_hidden_layers, heads=dcfg.num_attention_heads,
                                  head_dim=dcfg.hidden_size // dcfg.num_attention_heads, num_codebooks=self.num_codebooks,
                                  pad=self.pad_id, dtype=self.dtype, device=self.device)
        if self.dtype != torch.float32 and not self._outputs_finite():
            logger.warning("model %s gives non-finite outputs in %s; falling back to float32", name,
                           str(self.dtype).replace("torch.", ""))
            self._set_decoder_dtype(torch.float32)
            self._state.dtype = torch.float32
            self.weights = "dense"
            self.text.set_dtype(torch.float32)
        # Last: packing fixes the decoder's dtype. Every caller (our loop, generate) then uses the packed layers.
        from .kernels import accelerate, quantize_linears

        if self.weights in ("int8", "int4"):
            n = quantize_linears(model.decoder, 8 if self.weights == "int8" else 4)
            logger.info("decoder: %d linear layers with %s weights", n, self.weights)
            self.packed = n > 0
        else:
            self.weights = str(self.dtype).replace("torch.", "")
            self.packed = fast_kernels and accelerate(model.decoder, self.device, self.dtype)
        self.decoder = resolve_decoder(decoder, self.device)
        self._slots: SlotDecoder | None = self._slot_decoder(seed) if self.decoder == "static" else None
        logger.info("decode path: %s%s", self.decoder,
                    f" ({self._slots.kernels} kernels)" if self._slots is not None else "")

    def _slot_decoder(self, seed: int | None) -> "SlotDecoder":
        """The static path: fixed KV slots and one decode step for all of them (captured as a CUDA graph)."""
        from .slots import SlotDecoder, SlotShape
        from .step import DecoderParts

        torch = self._torch
        dcfg = self.model.config.decoder
        heads = dcfg.num_attention_heads
        layers = self.model.decoder.model.decoder.layers
        # Fused q/k/v projections where the layers are stock (CUDA); CPU layers are packed for oneDNN instead.
        parts = DecoderParts.of(self.model.decoder, self._positions.original.weights.to(self.dtype),
                                fuse_qkv=self.device.startswith("cuda"))
        shape = SlotShape(layers=dcfg.num_hidden_layers, heads=heads, head_dim=dcfg.hidden_size // heads,
                          codebooks=self.num_codebooks, vocab=self.vocab_size, window=self.window_frames + self.num_codebooks,
                          dtype=self.dtype, device=self.device)

        def cross_kv(layer: int, states):  # (n, S, D) -> keys, values (n, H, S, d)
            attn = layers[layer].encoder_attn
            n, S, _ = states.shape
            return (attn.k_proj(states).view(n, S, heads, -1).transpose(1, 2),
                    attn.v_proj(states).view(n, S, heads, -1).transpose(1, 2))

        slots = SlotDecoder(parts, shape, self.pad_id, self._prefill, self.conditioning, cross_kv, self.pattern)
        slots.generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
        return slots

    def memory_bytes(self) -> int:
        """Weights, buffers and the decode state's KV cache, in bytes."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors) + self.decode_state_bytes()

    def _set_decoder_dtype(self, dtype) -> None:  # dtype: torch.dtype
        """The decoder is where the time goes; text encoder and EnCodec stay fp32 (run rarely, quality-critical)."""
        self.dtype = dtype
        self.model.decoder.to(dtype)
        if hasattr(self.model, "enc_to_dec_proj"):
            self.model.enc_to_dec_proj.to(dtype)

    def _outputs_finite(self) -> bool:
        """One decoder step in the chosen dtype: are the logits finite? (Reduced precision can overflow.)"""
        torch = self._torch
        K = self.num_codebooks
        states = self.encode_text("a short check of the decoder")[None]
        with torch.inference_mode():
            ids = torch.full((K, 1), self.pad_id, dtype=torch.long, device=self.device)
            logits = self.model.decoder(input_ids=ids, encoder_hidden_states=states).logits
        return bool(torch.isfinite(logits).all())

    # -- text conditioning (musicgen/text.py) ------------------------------------------------------------------
    def encode_text(self, prompt: str):  # -> torch.Tensor (tokens, hidden)
        """Projected text states for a prompt (cached per prompt)."""
        return self.text.encode(prompt)

    def conditioning(self, request: ContinuationRequest):  # -> torch.Tensor (tokens, hidden)
        """Text states for a request; during a blend, the old and new prompts' states interpolated."""
        return self.text.conditioning(request)

    # -- the batched step ------------------------------------------------------------------------------------
    def continue_batch(self, requests: Sequence[ContinuationRequest], frames: int) -> list[ContinuationResult]:
        """Continue every request by ``frames`` frames in one batched decoder pass, then decode the audio."""
        if not requests:
            return []
        if frames < 1:
            raise ValueError("frames must be >= 1")
        for r in requests:  # conditioning first: a request the text encoder refuses must not sink the batch
            try:
                self.conditioning(r)
            except Exception as exc:  # noqa: BLE001 - tokenizer/encoder errors of any kind mean the same here
                raise ConditioningError(r.key, f"its prompt cannot be encoded: {type(exc).__name__}: "
                                               f"{str(exc)[:200]}") from exc
        with self._lock:
            self.calls += 1
            self.last_batch_size = len(requests)
            if self._slots is not None:
                generated = self._generate_static(requests, frames)
            else:
                try:
                    generated = self._generate_codes(requests, frames)
                except BaseException:
                    # A chunk cut short (steps that ran part-way, a prefill or an assembly interrupted): the live
                    # rows' caches no longer match their stations' codes; the next chunk prefills them afresh.
                    self._state.drop_live()
                    raise
            self.state_bytes = self.decode_state_bytes()
            new_codes = [c for c, _ in generated]
            t0 = time.monotonic()
            pcm = self.codec.decode(requests, new_codes)
            self.last_decode_seconds = time.monotonic() - t0
        return [ContinuationResult(codes=c, pcm=p, overlap=r.decoded_overlap, fresh=fresh)
                for r, (c, fresh), p in zip(requests, generated, pcm)]

    def forget(self, key: str) -> None:
        """Drop a station's decode state (it is rebuilt from its codes if it comes back)."""
        with self._lock:
            self._state.forget(key)
            if self._slots is not None:
                self._slots.forget(key)

    def _generate_static(self, requests: Sequence[ContinuationRequest], frames: int) -> list[tuple[np.ndarray, bool]]:
        slots = self._slots
        if slots is None:
            raise ModelError("the static decode path was asked for a chunk but is not set up")
        keys = [r.key or f"{ANON}{id(r)}:{i}" for i, r in enumerate(requests)]
        try:
            return slots.generate(requests, keys, frames, self.window_frames)
        finally:
            for key in keys:
                if key.startswith(ANON):
                    slots.forget(key)  # a keyless request never comes back: its slot is free at once
            self.resets = slots.resets
            self.last_steps = slots.last_steps
            self.last_prefill_seconds = slots.last_prefill_seconds

    @property
    def batch_limit(self) -> int:
        """The most stations one step should take: every slot that fits (static path), else 16 (on a CPU a
        step's cost grows with every row; more rows than that only delay everyone's next chunk)."""
        return self._slots.max_slots if self._slots is not None else 16

    def reset_slot_limit(self) -> None:
        """Bench: after an out-of-memory probe, let the slots grow again to what free memory allows."""
        if self._slots is not None:
            self._slots.max_slots = self._slots.slots_that_fit()

    @property
    def dynamic_state(self):  # -> DecodeState
        """The dynamic path's rows and KV buffers (live and parked)."""
        return self._state

    @property
    def slots(self) -> "SlotDecoder | None":
        """The static path's slots (None on the dynamic path): which station holds which, their limit."""
        return self._slots

    def hold_resets(self, hold: bool) -> None:
        """Bench only: hold window resets off (``True``) while steady chunks are measured; a reset's cost is
        measured on its own and charged at the rate the engine incurs it."""
        if hold:
            self._window_kept = self.window_frames
            self.window_frames = self.max_positions - 8
        elif self._window_kept is not None:
            self.window_frames, self._window_kept = self._window_kept, None
        self.spread_resets = not hold
        if self._slots is not None:
            self._slots.spread_resets = not hold

    def decode_state_bytes_per_station(self, stations: int) -> int:
        """What one station's decode state costs: a slot (static path), or its share of the buffers."""
        if self._slots is not None:
            return self._slots.bytes_per_slot()
        return self._state.nbytes() // max(1, stations)

    def describe(self) -> dict[str, str | int | None]:
        slots = self._slots
        kernels = ((f"{self.weights}-weight-only" if self.weights in ("int8", "int4") else "onednn-packed")
                   if self.packed else "stock")
        return {"device": self.device, "decoder": self.decoder, "weights": self.weights, "channels": self.channels,
                "kernels": slots.kernels if slots is not None else kernels,
                "batch_limit": self.batch_limit, "decode_state_bytes": self.state_bytes,
                "slots_used": sum(k is not None for k in list(slots.keys)) if slots is not None else None,
                "slot_bytes": slots.bytes_per_slot() if slots is not None else None}

    def decode_state_bytes(self) -> int:
        """Memory of the decode state (KV caches, slots) alone, in bytes."""
        return self._state.nbytes() + (self._slots.nbytes() if self._slots is not None else 0)

    def _generate_codes(self, requests: Sequence[ContinuationRequest], frames: int) -> list[tuple[np.ndarray, bool]]:
        """The dynamic path: decode ``frames`` (or more) new frames for every request; returns (codes, was_fresh)
        per request. Rows are placed (kept, brought back from parking, or prefilled), the buffers assembled for
        the chunk, then :meth:`_decode_steps` runs the chunk's steps."""
        from .decoding import fresh_row

        state = self._state
        use_cfg = any(r.sampling.guidance > 1.0 for r in requests)
        keys = [r.key or f"{ANON}{id(r)}:{i}" for i, r in enumerate(requests)]
        plan, keep_idx = self._place_rows(keys, requests, frames, use_cfg)
        fresh_req, steps = plan.fresh, plan.steps
        self.last_steps = steps

        kept_keys = {state.rows[j].key for j in keep_idx}
        fresh = [fresh_row(keys[i], requests[i].context, self.window_frames, steps, self.pad_id, self.pattern)
                 for i in fresh_req]
        self.last_prefill_seconds = 0.0
        if fresh or len(keep_idx) != len(state.rows):
            t0 = time.monotonic()
            kv, length, offsets = self._prefill([row for row, _ in fresh], [ctx for _, ctx in fresh],
                                                [requests[i] for i in fresh_req], use_cfg)
            self.last_prefill_seconds = time.monotonic() - t0
            state.assemble(keep_idx, [row for row, _ in fresh], kv, length, offsets, use_cfg, steps)
        else:
            state.fit(steps)
        order = {row.key: n for n, row in enumerate(state.rows)}
        row_requests = [requests[i] for i in sorted(range(len(requests)), key=lambda i: order[keys[i]])]
        out = self._decode_steps(row_requests, use_cfg, steps)
        results: dict[str, tuple[np.ndarray, bool]] = {}
        for b, row in enumerate(state.rows):
            results[row.key] = (row.emit(out[b], row_requests[b].context), row.key not in kept_keys)
        return [results[k] for k in keys]

    def _place_rows(self, keys: list[str], requests: Sequence[ContinuationRequest], frames: int,
                    use_cfg: bool) -> tuple["ChunkPlan", list[int]]:
        """The chunk's plan (:func:`.plan.plan_chunk`) for this layout, and the rows of the state the plan keeps
        (indices into its rows, in the plan's order). A row continues when it holds its station's codes in the
        chunk's guidance layout. Rows this chunk leaves out are parked with their caches; parked rows asked for
        again come back as they were if they still continue their station's codes."""
        from .plan import plan_chunk

        K = self.num_codebooks
        state = self._state
        state.max_columns = self.window_frames + K  # kept rows stay within the window (+ a fresh row's warm-up)
        state.park({k for k in state.row_keys() if k not in keys and not k.startswith(ANON)})
        back = []
        for key, r in zip(keys, requests):
            parked = state.parked.get(key)
            if parked is None:
                continue
            if parked.cfg == use_cfg and (not state.rows or state.cfg == use_cfg) and state.matches(parked.row,
                                                                                                     r.context):
                back.append(key)
            else:
                del state.parked[key]
        state.unpark(back, room=frames + self.pattern.max_delay)  # the chunk's steps, with a fresh row's warm-up
        existing = {row.key: i for i, row in enumerate(state.rows)}
        row_of: dict[int, int] = {}
        for i, (key, r) in enumerate(zip(keys, requests)):
            j = existing.get(key)
            if j is not None and state.cfg == use_cfg and state.matches(state.rows[j], r.context):
                row_of[i] = j
        plan = plan_chunk(len(requests), {i: state.tokens(j) for i, j in row_of.items()}, self.window_frames,
                          frames, self.pattern.max_delay, self.spread_resets)
        for i in plan.resets:
            self.resets += 1
            logger.debug("window reset for %s after %d frames", keys[i], state.tokens(row_of[i]))
        return plan, [row_of[i] for i in plan.keep]

    def _decode_steps(self, row_requests: Sequence[ContinuationRequest], use_cfg: bool, steps: int) -> np.ndarray:
        """The chunk's decode steps over the assembled rows (transformers' decoder, one token per row, on our
        in-place KV buffers): returns the sampled columns, (rows, K, steps)."""
        torch = self._torch
        K, dev = self.num_codebooks, self.device
        state = self._state
        B = len(state.rows)
        guidance = torch.tensor([r.sampling.guidance for r in row_requests], dtype=torch.float32, device=dev)
        temperature = torch.tensor([r.sampling.temperature for r in row_requests], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(1, min(r.sampling.top_k, self.vocab_size)) for r in row_requests], device=dev)
        enc, enc_mask = self.text.batch(row_requests, use_cfg)
        cache = state.cache()
        offsets = state.physical_offsets().to(dev)
        rows = state.physical
        next_cols = np.stack([row.next_column for row in state.rows])
        decoder = self.model.decoder
        out = np.empty((B, K, steps), dtype=np.int64)
        columns = torch.arange(state.capacity, device=dev)  # attention sees the whole (chunk-sized) buffer
        try:
            with torch.inference_mode():
                for j in range(steps):
                    tok = torch.from_numpy(next_cols).to(dev)
                    if use_cfg:
                        tok = torch.cat([tok, tok])
                    L = state.length
                    mask = ((columns[None, :] >= offsets[:, None]) & (columns[None, :] <= L)).long()
                    self._positions.position_ids = (L - offsets)[:, None]
                    res = decoder(input_ids=tok.reshape(rows * K, 1), attention_mask=mask, encoder_hidden_states=enc,
                                  encoder_attention_mask=enc_mask, use_cache=True, **{self._cache_kw: cache})
                    state.sync_length(cache)
                    logits = res.logits[:, -1, :].float().reshape(rows, K, -1)
                    sampled = self._sample(logits, B, use_cfg, guidance, temperature, top_k).cpu().numpy()
                    for b, row in enumerate(state.rows):
                        if row.steps < self.pattern.max_delay:  # warm-up: codebooks still in the context
                            f = row.forced[:, row.steps]
                            sampled[b] = np.where(f >= 0, f, sampled[b])
                        row.steps += 1
                    out[:, :, j] = sampled
                    next_cols = sampled
        finally:
            self._positions.position_ids = None
        return out

    def _prefill(self, rows: list, contexts: list[np.ndarray], requests: Sequence[ContinuationRequest],
                 use_cfg: bool):
        """Run fresh rows' contexts (all but their last column) through the decoder; return their KV."""
        torch = self._torch
        K, pad, dev = self.num_codebooks, self.pad_id, self.device
        lengths = [c.shape[1] for c in contexts]
        P = max(lengths, default=0)
        if not rows or P == 0:
            return None, 0, [0] * len(rows)
        B = len(rows)
        ids = torch.full((B, K, P), pad, dtype=torch.long)
        offsets = torch.zeros(B, dtype=torch.long)
        for i, ctx in enumerate(contexts):
            T = ctx.shape[1]
            off = P - T
            offsets[i] = off
            ids[i, :, off:] = torch.from_numpy(self.pattern.columns(ctx, T, pad))  # column T: the first step's
        offs = torch.cat([offsets, offsets]) if use_cfg else offsets
        ids = torch.cat([ids, ids]) if use_cfg else ids
        phys = ids.shape[0]
        mask = (torch.arange(P)[None, :] >= offs[:, None]).long()
        enc, enc_mask = self.text.batch(requests, use_cfg)
        self._positions.position_ids = (torch.arange(P)[None, :] - offs[:, None]).to(dev)
        try:
            with torch.inference_mode():
                res = self.model.decoder.model(input_ids=ids.reshape(phys * K, P).to(dev), attention_mask=mask.to(dev),
                                               encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                                               use_cache=True)
        finally:
            self._positions.position_ids = None
        layers = output_cache(res).self_attention_cache.layers
        return [(layer.keys, layer.values) for layer in layers], P, [int(o) for o in offsets]

    def _sample(self, logits, B: int, use_cfg: bool, guidance, temperature, top_k):
        """The step's codes from its logits (physical rows, K, V): :func:`.sampling.guide` and :func:`.sampling.sample`,
        the same functions as the slot path's."""
        from .sampling import guide, sample

        logits = guide(logits[:B], logits[B:] if use_cfg else None, guidance)
        noise = self._torch.rand(logits.shape, generator=self._generator, device=logits.device)
        return sample(logits, temperature, top_k, noise, int(top_k.max()))

    # -- audio (musicgen/codec.py) --------------------------------------------------------------------------------
    @property
    def decode_group(self) -> int:
        """Stations per EnCodec call now (halved on an out-of-memory error)."""
        return self.codec.group

    @property
    def nonfinite(self) -> int:
        """Chunks whose audio had NaN/inf (replaced by silence)."""
        return self.codec.nonfinite
