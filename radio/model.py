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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "facebook/musicgen-small"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Sampling:
    """Per-station sampling settings; applied per batch row."""

    temperature: float = 1.0
    top_k: int = 250
    guidance: float = 3.0


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


@dataclass
class ContinuationResult:
    """New codes ``(codebooks, frames)`` and float32 mono PCM for ``overlap + frames`` frames."""

    codes: np.ndarray
    pcm: np.ndarray
    overlap: int


class MusicModel(Protocol):
    """What the engine needs from a music model."""

    sample_rate: int
    frame_rate: int
    num_codebooks: int
    samples_per_frame: int

    def continue_batch(self, requests: Sequence[ContinuationRequest], frames: int) -> list[ContinuationResult]:
        """Generate ``frames`` new frames for every request in ONE batched pass."""
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


class _RowPositions:
    """Per-row position ids for MusicGen's sinusoidal positions (transformers' module has none).

    A row left-padded by ``off`` tokens must still see its BOS at position 0, as in training; without this,
    a new station batched next to an old one would start at the old one's position. Installed in place of
    ``embed_positions``; ``position_ids`` (rows, seq) is set before each decoder call.
    """

    def __init__(self, original) -> None:  # original: MusicgenSinusoidalPositionalEmbedding
        self.original = original
        self.position_ids = None

    def __call__(self, input_ids, past_key_values_length: int = 0):
        if self.position_ids is None:
            return self.original(input_ids, past_key_values_length)
        weights = self.original.weights
        return weights[self.position_ids.clamp(min=0, max=weights.shape[0] - 1)]


class MusicgenModel:
    """A MusicGen checkpoint loaded with ``from_pretrained``, continued in batches.

    Not thread-safe by design: the engine thread is its only caller.
    """

    def __init__(self, name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", seed: int | None = None,
                 text_cache_size: int = 256) -> None:
        import torch
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        self.name = name
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        local = Path(name).expanduser()
        source = str(local) if local.exists() else name
        if local.exists() and not (local / "config.json").exists():
            raise ModelError(f"model directory {local} has no config.json; point --model at a MusicGen checkpoint")
        logger.info("loading model %s on %s (%s)", source, self.device, str(self.dtype).replace("torch.", ""))
        try:
            model = MusicgenForConditionalGeneration.from_pretrained(source)
            processor = AutoProcessor.from_pretrained(source)
        except OSError as exc:
            raise ModelError(
                f"could not load model {name!r}: {exc}. Use a hub id such as {DEFAULT_MODEL} (needs network on "
                "first use) or a local checkpoint directory"
            ) from exc
        if model.config.decoder.audio_channels != 1:
            raise ModelError(f"model {name!r} is stereo; only mono MusicGen checkpoints are supported")
        model.eval().to(self.device)
        # The decoder is where the time goes; text encoder and EnCodec stay fp32 (run rarely / quality-critical).
        model.decoder.to(self.dtype)
        if hasattr(model, "enc_to_dec_proj"):
            model.enc_to_dec_proj.to(self.dtype)
        self._torch = torch
        self.model = model
        inner = model.decoder.model.decoder
        self._positions = _RowPositions(inner.embed_positions)
        # Plain attribute, not a submodule: keeps state_dict and .to() of the real module untouched.
        object.__setattr__(inner, "embed_positions", self._positions)
        self.tokenizer = processor.tokenizer
        audio_cfg = model.config.audio_encoder
        self.sample_rate = int(audio_cfg.sampling_rate)
        self.frame_rate = int(audio_cfg.frame_rate)
        self.samples_per_frame = self.sample_rate // self.frame_rate
        self.num_codebooks = int(model.decoder.num_codebooks)
        self.pad_id = int(model.generation_config.pad_token_id
                          if model.generation_config.pad_token_id is not None else model.config.decoder.pad_token_id)
        self.vocab_size = int(model.config.decoder.vocab_size)
        self.max_positions = int(model.config.decoder.max_position_embeddings)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        self._text_cache: OrderedDict[str, object] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()
        self.calls = 0  # batched continuation calls so far (status and tests)
        self.last_batch_size = 0

    # -- text conditioning ----------------------------------------------------------------------------------
    def _project(self, hidden):  # torch.Tensor -> torch.Tensor
        m = self.model
        if (m.text_encoder.config.hidden_size != m.decoder.config.hidden_size
                and m.decoder.config.cross_attention_hidden_size is None):
            hidden = m.enc_to_dec_proj(hidden.to(self.dtype))
        return hidden.to(self.dtype)

    def encode_text(self, prompt: str):  # -> torch.Tensor (tokens, hidden)
        """Projected text states for a prompt; cached, so a prompt is encoded once until evicted."""
        cached = self._text_cache.get(prompt)
        if cached is not None:
            self._text_cache.move_to_end(prompt)
            return cached
        torch = self._torch
        with torch.inference_mode():
            tokens = self.tokenizer([prompt], return_tensors="pt")
            ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
            hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            states = self._project(hidden)[0]
        self._text_cache[prompt] = states
        while len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return states

    # -- the batched step ------------------------------------------------------------------------------------
    def continue_batch(self, requests: Sequence[ContinuationRequest], frames: int) -> list[ContinuationResult]:
        """Continue every request by ``frames`` frames in one batched decoder pass, then decode the audio."""
        if not requests:
            return []
        if frames < 1:
            raise ValueError("frames must be >= 1")
        with self._lock:
            self.calls += 1
            self.last_batch_size = len(requests)
            new_codes = self._generate_codes(requests, frames)
            pcm = self._decode(requests, new_codes)
        return [ContinuationResult(codes=c, pcm=p, overlap=min(r.overlap, r.context.shape[1]))
                for r, c, p in zip(requests, new_codes, pcm)]

    def _generate_codes(self, requests: Sequence[ContinuationRequest], frames: int) -> list[np.ndarray]:
        torch = self._torch
        K, pad, dev = self.num_codebooks, self.pad_id, self.device
        B = len(requests)
        # Keep the window inside the model's positional table: prompt + new frames + delay tail.
        limit = self.max_positions - frames - K - 1
        contexts = [np.asarray(r.context, dtype=np.int64)[:, -limit:] if limit > 0 else
                    np.zeros((K, 0), np.int64) for r in requests]
        lengths = [c.shape[1] for c in contexts]
        L = max(lengths) + 1  # + the BOS column

        # Delay pattern: position p of codebook k holds frame p-1-k; earlier positions are pad (= BOS).
        ids = torch.full((B, K, L), pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        offsets = torch.zeros((B, 1), dtype=torch.long)
        # forced[i, k, j]: codebook k at generation step j < k still belongs to the known context.
        forced = torch.full((B, K, K), pad, dtype=torch.long)
        for i, ctx in enumerate(contexts):
            T = ctx.shape[1]
            off = L - (T + 1)
            offsets[i] = off
            mask[i, off:] = 1
            c = torch.from_numpy(ctx)
            for k in range(K):
                n = max(0, T - k)  # frames of codebook k that fit before the generation start
                if n:
                    ids[i, k, off + 1 + k: off + 1 + k + n] = c[k, :n]
                for j in range(k):
                    f = T + j - k
                    if f >= 0:
                        forced[i, k, j] = c[k, f]
        ids, mask, forced, offsets = ids.to(dev), mask.to(dev), forced.to(dev), offsets.to(dev)

        guidance = torch.tensor([r.sampling.guidance for r in requests], dtype=torch.float32, device=dev)
        temperature = torch.tensor([r.sampling.temperature for r in requests], dtype=torch.float32, device=dev)
        top_k = torch.tensor([max(1, min(r.sampling.top_k, self.vocab_size)) for r in requests], device=dev)
        use_cfg = bool((guidance > 1.0).any())

        enc, enc_mask = self._text_batch([r.prompt for r in requests], use_cfg)
        rows = 2 * B if use_cfg else B
        dec_ids = (torch.cat([ids, ids]) if use_cfg else ids).reshape(rows * K, L)
        dec_mask = torch.cat([mask, mask]) if use_cfg else mask
        row_offsets = torch.cat([offsets, offsets]) if use_cfg else offsets
        positions = torch.arange(L, device=dev)[None, :] - row_offsets

        steps = frames + K - 1
        out = torch.empty((B, K, steps), dtype=torch.long, device=dev)
        past = None
        decoder = self.model.decoder
        with torch.inference_mode():
            for j in range(steps):
                self._positions.position_ids = positions
                res = decoder(input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=enc,
                              encoder_attention_mask=enc_mask, past_key_values=past, use_cache=True)
                past = res.past_key_values
                logits = res.logits[:, -1, :].float().reshape(rows, K, -1)
                tok = self._sample(logits, B, use_cfg, guidance, temperature, top_k)
                if j < K - 1:
                    keep = torch.arange(K, device=dev) <= j  # codebooks already past their delay
                    tok = torch.where(keep[None, :], tok, forced[:, :, j])
                out[:, :, j] = tok
                step_ids = torch.cat([tok, tok]) if use_cfg else tok
                dec_ids = step_ids.reshape(rows * K, 1)
                dec_mask = torch.cat([dec_mask, torch.ones((rows, 1), dtype=dec_mask.dtype, device=dev)], dim=1)
                positions = positions[:, -1:] + 1
        self._positions.position_ids = None
        # Undo the delay: new frame f of codebook k was produced at step f + k.
        result = torch.stack([out[:, k, k:k + frames] for k in range(K)], dim=1).cpu().numpy()
        return [result[i] for i in range(B)]

    def _text_batch(self, prompts: Sequence[str], use_cfg: bool):
        torch = self._torch
        states = [self.encode_text(p) for p in prompts]
        S = max(s.shape[0] for s in states)
        D = states[0].shape[1]
        enc = torch.zeros((len(states), S, D), dtype=self.dtype, device=self.device)
        enc_mask = torch.zeros((len(states), S), dtype=torch.long, device=self.device)
        for i, s in enumerate(states):
            enc[i, : s.shape[0]] = s
            enc_mask[i, : s.shape[0]] = 1
        if use_cfg:
            # The unconditional half: zeroed text states, fully masked (what transformers' generate feeds).
            enc = torch.cat([enc, torch.zeros_like(enc)])
            enc_mask = torch.cat([enc_mask, torch.zeros_like(enc_mask)])
        return enc, enc_mask

    def _sample(self, logits, B: int, use_cfg: bool, guidance, temperature, top_k):
        """Per-row classifier-free guidance, temperature and top-k; rows with temperature 0 are greedy."""
        torch = self._torch
        if use_cfg:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + (cond - uncond) * guidance[:, None, None]
        greedy = logits.argmax(dim=-1)
        scaled = logits / temperature.clamp(min=1e-5)[:, None, None]
        kmax = int(top_k.max())
        top = scaled.topk(kmax, dim=-1).values  # (B, K, kmax), descending
        kth = top.gather(-1, (top_k - 1)[:, None, None].expand(B, logits.shape[1], 1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1).reshape(-1, logits.shape[-1])
        sampled = torch.multinomial(probs, 1, generator=self._generator).reshape(B, -1)
        is_greedy = (temperature <= 0) | (top_k <= 1)
        return torch.where(is_greedy[:, None], greedy, sampled)

    # -- audio ----------------------------------------------------------------------------------------------
    def _decode(self, requests: Sequence[ContinuationRequest], new_codes: Sequence[np.ndarray]) -> list[np.ndarray]:
        """EnCodec-decode overlap + new frames; requests of equal length share one decoder call."""
        torch = self._torch
        seqs = []
        for r, c in zip(requests, new_codes):
            ov = min(r.overlap, r.context.shape[1])
            seqs.append(np.concatenate([r.context[:, r.context.shape[1] - ov:], c], axis=1) if ov else c)
        out: list[np.ndarray | None] = [None] * len(seqs)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(s.shape[1], []).append(i)
        with torch.inference_mode():
            for idx in by_len.values():
                codes = torch.from_numpy(np.stack([seqs[i] for i in idx])).to(self.device)[None]
                audio = self.model.audio_encoder.decode(codes, audio_scales=[None] * len(idx)).audio_values
                audio = audio[:, 0].float().cpu().numpy()
                for j, i in enumerate(idx):
                    out[i] = np.ascontiguousarray(audio[j, : seqs[i].shape[1] * self.samples_per_frame],
                                                  dtype=np.float32)
        return [o for o in out if o is not None]
