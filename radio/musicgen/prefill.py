"""The prefill: fresh rows' contexts through transformers' decoder in one batched pass, their KV caches out.

A station's codes become a row's cache here (a new station, a reset at the window, codes its row does not
continue); both KV layouts copy what this returns into their own buffers. Prefills are rare (once per
station per window), so they run through transformers' own modules; the per-step work is :mod:`.step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .decoding import kv8_pack
from .pattern import DelayPattern

if TYPE_CHECKING:
    from .decoding import Row
    from .text import TextConditioning
    from .types import ContinuationRequest


def output_cache(output: Any) -> Any:  # -> transformers Cache
    """The KV cache a transformers forward returned, under either of its names."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


class RowPositions:
    """Per-row position ids for MusicGen's sinusoidal positions (transformers' module has none).

    A row left-padded by ``off`` tokens must still see its BOS at position 0, as in training; without this,
    a new station batched next to an old one would start at the old one's position. Installed in place of
    ``embed_positions``; ``position_ids`` (rows, seq) is set around a prefill.
    """

    def __init__(self, original: Any) -> None:  # original: MusicgenSinusoidalPositionalEmbedding
        self.original = original
        self.position_ids: Any = None  # torch.Tensor (rows, seq) while a call of ours runs

    @classmethod
    def install(cls, causal_lm: Any) -> "RowPositions":
        """Put per-row positions into a ``MusicgenForCausalLM``'s decoder (a plain attribute, not a submodule:
        the real module's state_dict and ``.to()`` stay untouched)."""
        inner = causal_lm.model.decoder
        positions = cls(inner.embed_positions)
        object.__setattr__(inner, "embed_positions", positions)
        return positions

    def __call__(self, input_ids: Any, cache_length: int = 0) -> Any:
        if self.position_ids is None:
            return self.original(input_ids, cache_length)
        weights = self.original.weights
        return weights[self.position_ids.clamp(min=0, max=weights.shape[0] - 1)]


class Prefill:
    """Runs fresh rows' contexts (all but the column their first step feeds) through the decoder."""

    def __init__(self, causal_lm: Any, positions: RowPositions, text: "TextConditioning", pattern: DelayPattern,
                 pad: int, device: str, kv8: bool = False) -> None:
        self.causal_lm = causal_lm  # MusicgenForCausalLM (model.decoder)
        self.kv8 = kv8  # hand the keys and values over kv8_pack()ed, as an 8-bit cache holds them
        self.positions = positions
        self.text = text
        self.pattern = pattern
        self.pad = pad
        self.device = device

    def __call__(self, rows: list["Row"], contexts: list[np.ndarray], requests: Sequence["ContinuationRequest"],
                 use_cfg: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]] | None, int, list[int]]:
        """Per layer (keys, values) of the rows, (physical rows, H, P, d) right-aligned (with guidance, the
        unconditional twins follow the conditional rows; in an 8-bit cache's format when ``kv8``), P, and each
        row's left padding."""
        K, pad, dev = self.pattern.num_codebooks, self.pad, self.device
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
        self.positions.position_ids = (torch.arange(P)[None, :] - offs[:, None]).to(dev)
        try:
            with torch.inference_mode():
                res = self.causal_lm.model(input_ids=ids.reshape(phys * K, P).to(dev), attention_mask=mask.to(dev),
                                           encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=True)
        finally:
            self.positions.position_ids = None
        layers = output_cache(res).self_attention_cache.layers
        kv = [(layer.keys, layer.values) for layer in layers]
        if self.kv8:
            kv = [(kv8_pack(k), kv8_pack(v)) for k, v in kv]
        return kv, P, [int(o) for o in offsets]
