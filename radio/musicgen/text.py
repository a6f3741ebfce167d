"""Text conditioning: a prompt's projected T5 states (cached per prompt), blends of two prompts, and the batch
of cross-attention states a chunk's rows read (with the unconditional half for guidance)."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from .model import ContinuationRequest


class TextConditioning:
    def __init__(self, model: Any, tokenizer: Any, device: str, dtype: torch.dtype, cache_size: int = 256) -> None:
        self.model = model  # MusicgenForConditionalGeneration: its text encoder and projection
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype  # the decoder's: states are handed over in it (changed with it: set_dtype)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._cache.clear()

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.model
        if (m.text_encoder.config.hidden_size != m.decoder.config.hidden_size
                and m.decoder.config.cross_attention_hidden_size is None):
            hidden = m.enc_to_dec_proj(hidden.to(self.dtype))
        return hidden.to(self.dtype)

    def encode(self, prompt: str) -> torch.Tensor:
        """Projected text states for a prompt, (tokens, hidden); cached, so a prompt is encoded once until
        evicted."""
        cached = self._cache.get(prompt)
        if cached is not None:
            self._cache.move_to_end(prompt)
            return cached
        with torch.inference_mode():
            tokens = self.tokenizer([prompt], return_tensors="pt")
            ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
            hidden = self.model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            states = self._project(hidden)[0]
        self._cache[prompt] = states
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return states

    def conditioning(self, request: "ContinuationRequest") -> torch.Tensor:
        """Text states for a request; during a blend, the old and new prompts' states interpolated."""
        new = self.encode(request.prompt)
        if not request.blend_from or request.blend >= 1.0:
            return new
        old = self.encode(request.blend_from)
        n = max(old.shape[0], new.shape[0])
        a = float(min(1.0, max(0.0, request.blend)))
        mixed = torch.zeros((n, new.shape[1]), dtype=new.dtype, device=new.device)
        mixed[: old.shape[0]] += (1.0 - a) * old
        mixed[: new.shape[0]] += a * new
        return mixed

    def batch(self, requests: Sequence["ContinuationRequest"], use_cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' cross-attention states and mask, (rows, S, D) and (rows, S); with guidance, followed by
        the unconditional half: zeroed states, fully masked (what transformers' generate feeds)."""
        states = [self.conditioning(r) for r in requests]
        S = max(s.shape[0] for s in states)
        D = states[0].shape[1]
        enc = torch.zeros((len(states), S, D), dtype=self.dtype, device=self.device)
        enc_mask = torch.zeros((len(states), S), dtype=torch.long, device=self.device)
        for i, s in enumerate(states):
            enc[i, : s.shape[0]] = s
            enc_mask[i, : s.shape[0]] = 1
        if use_cfg:
            enc = torch.cat([enc, torch.zeros_like(enc)])
            enc_mask = torch.cat([enc_mask, torch.zeros_like(enc_mask)])
        return enc, enc_mask
