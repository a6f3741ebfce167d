"""MusicGen behind a small interface: load, encode text (cached), continue many streams in one batch.

The engine talks to :class:`MusicModel` only. :class:`MusicgenModel` is the real one (Hugging Face
transformers, loaded with ``from_pretrained`` from a hub id or a local checkpoint directory); tests may put a
fake with the same methods behind the engine.

The parts (``musicgen/``): ``types`` (the contract), ``pattern`` (the delay pattern), ``text`` (conditioning),
``plan`` (THE chunk plan), ``prefill``, ``step`` (THE decode step's layers, over either KV layout), ``sampling``,
``dynamic`` (the CPU's chunk loop over ``decoding``'s buffers), ``slots`` (the GPU's fixed slots and CUDA
graphs), ``codec`` (EnCodec), ``kernels`` (packed and quantized CPU layers). This module loads a checkpoint,
sets its precision and picks the path.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence


from ..config import CODEC, COMPILE, DECODERS, DEFAULT_MODEL, DTYPES, KERNELS, KV_FORMATS
from ..errors import ConditioningError, ModelError

from .pattern import DelayPattern
from .prefill import RowPositions
from .types import ANON, ContinuationRequest, ContinuationResult, MusicModel

__all__ = ["ContinuationRequest", "ContinuationResult", "MusicModel", "MusicgenModel"]

if TYPE_CHECKING:
    from .codec import Codec
    from .decoding import DecodeState
    from .dynamic import DynamicDecoder
    from .slots import SlotDecoder
    from .text import TextConditioning

logger = logging.getLogger(__name__)

DEVICES_HELP = "auto, cpu, cuda or cuda:N"


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


def resolve_compile(compile: str, device: str, dtype: Any, decoder: str, kv: str, native: bool = False) -> bool:
    """Whether to compile the decode step's layer (:mod:`.compiled`): a CPU feature of the dynamic path (CUDA
    captures its step as a graph instead). ``auto``: where the decoder runs in bf16 (dense, int8 or int4 weights)
    over a full cache, or over an 8-bit one that radio's kernel reads (``native``): the CPU defaults; ``always``
    also in float32 and over an 8-bit cache without it (compiled, PyTorch's code reads that slower than a full
    cache); ``never``. (Not on/off: YAML reads those as booleans.) Compiling may still fail (no C++ compiler):
    the model then keeps the eager layer."""
    import torch

    if compile not in COMPILE:
        raise ModelError(f"unknown compile {compile!r}: use one of {', '.join(COMPILE)}")
    if compile == "never" or device != "cpu" or decoder != "dynamic":
        return False
    return compile == "always" or (dtype == torch.bfloat16 and (kv == "full" or native))


def resolve_kv(kv: str, native: bool = False) -> str:
    """The KV cache's format: ``full`` (the decoder's dtype) or ``8bit`` (int8 with a float32 scale per token and
    head: half the memory, and on the GPU path half the bytes a step's attention reads, dequantized inside the
    fused kernel; on a CPU radio's kernel reads it as bytes, else attention upcasts it to float32). ``auto`` is
    8bit where radio's CPU kernel reads it and the decoder runs in bf16 (``native``: the dynamic path with
    ``kernels: auto`` on a CPU it builds for; half the bytes and twice the speed of the full cache's attention,
    logits within ~1.5 %: see the README), else full: PyTorch's upcast costs about what the halved reads save,
    and the 8-bit slots have not yet run on a card."""
    if kv not in KV_FORMATS:
        raise ModelError(f"unknown kv {kv!r}: use one of {', '.join(KV_FORMATS)}")
    if kv == "auto":
        return "8bit" if native else "full"
    return kv


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


def estimate_model_bytes(name: str, dtype: str = "auto", device: str = "cpu", weights: str = "auto") -> int | None:
    """Memory a checkpoint will take once loaded (weights in the dtype policy: decoder in ``dtype``, its linear
    layers' weights in ``weights`` (int8: a byte each, int4: half of one, plus their scales), text encoder and
    EnCodec in fp32), read from its config alone by building the model on the meta device. None when the config
    cannot be read (the load itself will then report why)."""
    import torch
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration

    try:
        config = MusicgenConfig.from_pretrained(model_source(name))
        with torch.device("meta"):
            skeleton = MusicgenForConditionalGeneration(config)
        where = resolve_device(device)
        torch_dtype = resolve_dtype(weights if weights in ("float32", "bfloat16") else dtype, where)
        held = resolve_weights(weights, where, torch_dtype)
        size = torch.tensor([], dtype=torch.bfloat16 if held in ("int8", "int4") else torch_dtype).element_size()
    except Exception as exc:  # noqa: BLE001 - an estimate is optional; the load reports real errors
        logger.debug("no size estimate for %s: %s", name, exc)
        return None
    total = sum(p.numel() for p in skeleton.parameters())
    decoder = sum(p.numel() for p in skeleton.decoder.parameters())
    buffers = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    linears = [m for m in skeleton.decoder.modules() if type(m) is torch.nn.Linear]
    linear, channels = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    # int8: a byte per weight and 8 per output channel; int4: half a byte and 4 per group of 64 (scale and low)
    quantized = {"int8": linear + 8 * channels, "int4": linear // 2 + 4 * linear // 64}.get(held)
    if quantized is None:
        return decoder * size + (total - decoder) * 4 + buffers
    return (decoder - linear) * size + quantized + (total - decoder) * 4 + buffers


def cache_keyword(module) -> str:
    """The name a transformers forward takes the KV cache by: ``cache`` since transformers renamed it (5.2x),
    ``past_key_values`` before (the old name is removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class MusicgenModel:
    """A MusicGen checkpoint loaded with ``from_pretrained``, continued in batches.

    Not thread-safe by design: the engine thread is its only caller.
    """

    def __init__(self, name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int | None = None,
                 text_cache_size: int = 256, window_frames: int | None = None,
                 window_seconds: float = 30.0, fast_kernels: bool = True, decoder: str = "auto",
                 weights: str = "auto", kv: str = "auto", compile: str = "auto", codec: str = "auto",
                 kernels: str = "auto") -> None:
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
        if kernels not in KERNELS:
            raise ModelError(f"unknown kernels {kernels!r}: use one of {', '.join(KERNELS)}")
        # radio's own CPU kernels (.native): built and checked on first use, by a model that can use them
        # (quantized weights, or an 8-bit cache: bf16 or asked for); PyTorch's where they cannot be
        from . import native as native_kernels

        self.native = (kernels == "auto" and self.device == "cpu"
                       and (self.weights in ("int8", "int4") or self.dtype == torch.bfloat16 or kv == "8bit")
                       and native_kernels.available())
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
        self.positions = RowPositions.install(model.decoder)
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
        from .codec import Codec  # torch-heavy, like the rest: imported only when a real model is loaded
        from .text import TextConditioning

        self.text: TextConditioning = TextConditioning(model, self.tokenizer, self.device, self.dtype,
                                                       text_cache_size)
        self._lock = threading.Lock()
        self.calls = 0  # batched continuation calls so far (status and tests)
        self.last_batch_size = 0
        self.last_decode_seconds = 0.0  # wall time of the last chunk's EnCodec decoding
        self.codec: Codec = Codec(model.audio_encoder, self.channels, self.samples_per_frame, self.device)
        self.state_bytes = 0  # decode state held after the last chunk (describe(): read without the lock)
        # Frames a row may hold before it is reset: MusicGen was trained on 30 s windows.
        self.window_frames = min(window_frames or int(window_seconds * self.frame_rate), self.max_positions - 8)
        if self.dtype != torch.float32 and not self._outputs_finite():
            logger.warning("model %s gives non-finite outputs in %s; falling back to float32", name,
                           str(self.dtype).replace("torch.", ""))
            self._set_decoder_dtype(torch.float32)
            self.weights = "dense"
            self.text.set_dtype(torch.float32)
        # Last: packing fixes the decoder's dtype. Every caller (our loop, generate) then uses the packed layers.
        from .kernels import accelerate, join_projections, quantize_linears

        if self.weights in ("int8", "int4"):
            n = quantize_linears(model.decoder, 8 if self.weights == "int8" else 4,
                                 "native" if self.native else "torch")
            join_projections(model.decoder)  # radio's kernels: q, k and v as one product
            logger.info("decoder: %d linear layers with %s weights (%s kernels)", n, self.weights,
                        "radio's" if self.native else "PyTorch's")
            self.packed = n > 0
        else:
            self.weights = str(self.dtype).replace("torch.", "")
            self.packed = fast_kernels and accelerate(model.decoder, self.device, self.dtype)
        self.decoder = resolve_decoder(decoder, self.device)
        dcfg = model.config.decoder
        head_size = int(dcfg.hidden_size // dcfg.num_attention_heads)
        # radio's kernel reads an 8-bit cache on the dynamic path, for the head sizes it takes (every MusicGen's)
        self.native_attention = self.native and self.decoder == "dynamic" and head_size in native_kernels.HEAD_SIZES
        # auto: the 8-bit cache where the decoder runs in bf16 (the CPU defaults; float32 is a choice of exactness)
        self.kv = resolve_kv(kv, self.native_attention and self.dtype == torch.bfloat16)
        self._compile_setting = compile
        self._compile = resolve_compile(compile, self.device, self.dtype, self.decoder, self.kv,
                                        self.native_attention)
        if codec not in CODEC:
            raise ModelError(f"unknown codec {codec!r}: use one of {', '.join(CODEC)}")
        # EnCodec in bf16 where the decoder runs in it on a CPU (measured there; a card's EnCodec is not)
        self.codec.set_dtype(codec, when_auto=self.device == "cpu" and self.dtype == torch.bfloat16)
        self._decoder: SlotDecoder | DynamicDecoder = self._make_decoder(seed)
        logger.info("decode path: %s%s", self.decoder,
                    f" ({self.slots.kernels} kernels)" if self.slots is not None else "")
        from .resident import release_checkpoint, resident_bytes

        # the tensors still in the checkpoint's file map (T5) get memory of their own: the map's pages leave the
        # resident set, and the heap hands back what quantizing and converting freed. Not for a float32 decoder:
        # there something outside the modules' tensors (not found) keeps the map, and copies would only add to
        # it (musicgen-small: 3.7 -> 4.9 GB)
        copied = release_checkpoint(model) if self.dtype != torch.float32 else 0
        rss = resident_bytes()
        logger.info("model resident: %s (%.0f MB copied out of the checkpoint's file map)",
                    f"{rss / 2**20:.0f} MB process RSS" if rss is not None else "RSS unknown", copied / 2**20)

    def _make_decoder(self, seed: int | None) -> "SlotDecoder | DynamicDecoder":
        """The decode path: ``static`` (fixed KV slots, the step captured as a CUDA graph) or ``dynamic`` (rows in
        chunk-sized buffers). Both run the same step layers (:mod:`.step`), plan (:mod:`.plan`), sampling
        (:mod:`.sampling`) and prefill (:mod:`.prefill`)."""
        from .dynamic import DynamicDecoder
        from .prefill import Prefill
        from .slots import SlotDecoder, SlotShape
        from .step import DecoderParts

        dcfg = self.model.config.decoder
        heads = dcfg.num_attention_heads
        # Fused q/k/v projections where the layers are stock (CUDA); CPU layers are packed or quantized instead.
        parts = DecoderParts.of(self.model.decoder, self.positions.original.weights.to(self.dtype),
                                fuse_qkv=self.device.startswith("cuda"))
        parts.native = self.native_attention and self.kv == "8bit"
        prefill = Prefill(self.model.decoder, self.positions, self.text, self.pattern, self.pad_id, self.device,
                          kv8=self.kv == "8bit")
        decoder: SlotDecoder | DynamicDecoder
        if self.decoder == "static":
            shape = SlotShape(layers=dcfg.num_hidden_layers, heads=heads, head_dim=dcfg.hidden_size // heads,
                              codebooks=self.num_codebooks, vocab=self.vocab_size,
                              window=self.window_frames + self.num_codebooks, dtype=self.dtype, device=self.device,
                              kv8=self.kv == "8bit")
            decoder = SlotDecoder(parts, shape, prefill, self.text, self.pattern)
        else:
            from .decoding import DecodeState

            state = DecodeState(num_layers=dcfg.num_hidden_layers, heads=heads, head_dim=dcfg.hidden_size // heads,
                                num_codebooks=self.num_codebooks, pad=self.pad_id, dtype=self.dtype,
                                device=self.device, kv8=self.kv == "8bit")
            layer = None
            if parts.native and self.weights in ("int8", "int4") and self._compile_setting != "always":
                from .native.layers import LayerStack

                stack = LayerStack.of(parts)  # radio's layer loop: every layer of a step in one call
                parts.stack = stack if stack is not None and stack.works(parts) else None
            if self._compile and parts.stack is None:
                from .compiled import compile_layer

                layer = compile_layer(parts, self.dtype, self.device, kv8=self.kv == "8bit")
            decoder = DynamicDecoder(parts, prefill, self.text, state, self.pattern, self.vocab_size, self.device,
                                     layer)
        decoder.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        return decoder

    @property
    def native_in_use(self) -> bool:
        """Do radio's CPU kernels (:mod:`.native`) serve this model's weights or its 8-bit cache?"""
        return self.native and (self.weights in ("int8", "int4") or (self.native_attention and self.kv == "8bit"))

    @property
    def layer_loop(self) -> bool:
        """Does the decode step run its layers as one call of radio's kernels (:mod:`.native.layers`; false where
        they do not suit the model, it was not wanted (``compile: always``), or it failed since)?"""
        stack = getattr(getattr(self._decoder, "parts", None), "stack", None)
        return stack is not None and stack.failed is None

    @property
    def compile(self) -> bool:
        """Does the decode step run a compiled layer (:mod:`.compiled`; false where it was not wanted, could not
        be compiled, or failed since)?"""
        layer = getattr(self._decoder, "layer", None)
        return layer is not None and getattr(layer, "failed", None) is None

    def memory_bytes(self) -> int:
        """Weights, buffers and the decode state's KV cache, in bytes: each block of memory once (the joined
        q/k/v products' parts are views of them; oneDNN's packed weights, opaque, by their size)."""
        blocks: dict[tuple[str, int], int] = {}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.is_mkldnn:
                blocks["opaque", id(t)] = t.numel() * t.element_size()
            else:
                storage = t.untyped_storage()
                key = ("memory", storage.data_ptr())
                blocks[key] = max(blocks.get(key, 0), storage.nbytes())
        return sum(blocks.values()) + self.decode_state_bytes()

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
            keys = [r.key or f"{ANON}{id(r)}:{i}" for i, r in enumerate(requests)]
            try:
                generated = self._decoder.generate(requests, keys, frames, self.window_frames)
            finally:
                if self.slots is not None:
                    for key in keys:
                        if key.startswith(ANON):
                            self.slots.forget(key)  # a keyless request never comes back: its slot is free
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
            self._decoder.forget(key)

    @property
    def batch_limit(self) -> int:
        """The most stations one step should take: every slot that fits (static path), else 16 (on a CPU a
        step's cost grows with every row; more rows than that only delay everyone's next chunk)."""
        return self._decoder.max_slots

    @property
    def resets(self) -> int:
        """Window resets so far."""
        return self._decoder.resets

    @property
    def last_steps(self) -> int:
        """Decode steps of the last chunk."""
        return self._decoder.last_steps

    @property
    def last_prefill_seconds(self) -> float:
        """Wall time of the last chunk's prefill (the bench: a reset's cost)."""
        return self._decoder.last_prefill_seconds

    @property
    def decode_path(self) -> "SlotDecoder | DynamicDecoder":
        """The decode path in use (its plan settings, for the bench and tests)."""
        return self._decoder

    @property
    def dynamic_state(self) -> "DecodeState":
        """The dynamic path's rows and KV buffers (live and parked)."""
        from .dynamic import DynamicDecoder

        if not isinstance(self._decoder, DynamicDecoder):
            raise ModelError("the static decode path has no dynamic state")
        return self._decoder.state

    @property
    def slots(self) -> "SlotDecoder | None":
        """The static path's slots (None on the dynamic path): which station holds which, their limit."""
        from .slots import SlotDecoder

        return self._decoder if isinstance(self._decoder, SlotDecoder) else None

    def decode_state_bytes_per_station(self, stations: int) -> int:
        """What one station's decode state costs: a slot (static path), or its share of the buffers."""
        return self._decoder.bytes_per_station(stations)

    def describe(self) -> dict[str, str | int | None]:
        slots = self.slots
        kernels = ((f"{self.weights}-weight-only" if self.weights in ("int8", "int4") else "onednn-packed")
                   if self.packed else "stock")
        if self.native_in_use:
            kernels += " (radio's VNNI kernels)"
        return {"device": self.device, "decoder": self.decoder, "weights": self.weights, "kv": self.kv,
                "channels": self.channels, "codec": self.codec.dtype,
                "kernels": slots.kernels if slots is not None else kernels + (
                    ", compiled layers" if self.compile else ", radio's layer loop" if self.layer_loop else ""),
                "batch_limit": self.batch_limit, "decode_state_bytes": self.state_bytes,
                "slots_used": sum(k is not None for k in list(slots.keys)) if slots is not None else None,
                "slot_bytes": slots.bytes_per_slot() if slots is not None else None}

    def decode_state_bytes(self) -> int:
        """Memory of the decode state (KV caches, slots) alone, in bytes."""
        return self._decoder.nbytes()

    # -- audio (musicgen/codec.py) --------------------------------------------------------------------------------
    @property
    def decode_group(self) -> int:
        """Stations per EnCodec call now (halved on an out-of-memory error)."""
        return self.codec.group

    @property
    def nonfinite(self) -> int:
        """Chunks whose audio had NaN/inf (replaced by silence)."""
        return self.codec.nonfinite
