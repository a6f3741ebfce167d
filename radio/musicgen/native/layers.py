"""A decode step's decoder layers as ONE call of radio's CPU kernels (``kernels.cpp``: ``decode_layers``).

The CPU defaults (int8 or int4 weights on radio's products, an 8-bit KV cache read by its attention) spend a
step's time in those kernels and, around them, in the calls that reach them: the compiled layer
(:mod:`..compiled`) is a handful of C++ loops behind ~150 us of Python (the compiler's wrapper and the guards'
prologue), 24 times a step, ~4 ms of int8's ~20 ms at one station on two cores (profiled). ``decode_layers``
runs every layer of the step in C++ instead: the layer norms, the products, the key/value write into the 8-bit
cache, both attentions, GELU and the residual adds, in float32 between the products (the eager and compiled
layers round the activations to bf16 after each). :class:`LayerStack` holds its operands, taken once at load
from the model's own modules (the packed weights are the modules' tensors, not copies; the norms and the
unconditional rows' cross-attention constants as float32, a few hundred KB).

It serves the dynamic layout's steps (:func:`..step.row_logits`) where every decoder layer suits it
(:meth:`LayerStack.of`) and it agrees with the eager layers on a probe at load (:meth:`LayerStack.works`); a
model without it keeps the compiled or the eager layer. A failure inside a step switches that model back to the
layer it would have had, for good (the step's cache writes are made again by that layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from . import HEAD_SIZES, decode_layers

__all__ = ["LayerStack"]

logger = logging.getLogger(__name__)

PRODUCTS = (("self_attn", "qkv_proj"), ("self_attn", "out_proj"), ("encoder_attn", "q_proj"),
            ("encoder_attn", "out_proj"), (None, "fc1"), (None, "fc2"))  # in the order kernels.cpp takes them
NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
PROBE_COLUMNS, PROBE_PROMPT = 24, 6


@dataclass
class LayerStack:
    """``decode_layers``' operands for one model: per layer the three layer norms' weights and biases (float32)
    and the six products' packed tensors (q/k/v joined, out, cross-attention q and out, fc1, fc2; each (packed,
    scales, extra) of a :class:`..kernels.QuantLinear`), the unconditional rows' cross-attention outputs
    (layers, D) float32, and the constants."""

    norms: list[torch.Tensor]
    weights: list[torch.Tensor]
    uncond: torch.Tensor
    heads: int
    ffn: int
    eps: float
    scaling: float
    failed: str | None = None  # why it stopped serving, if it did

    @classmethod
    def of(cls, parts: Any) -> "LayerStack | None":
        """The stack of a model's decoder layers (``parts``: a :class:`..step.DecoderParts`), or None where a layer
        does not suit ``decode_layers``: every product one of radio's quantized kernels (8 or 4 bits, no bias,
        q/k/v joined), exact GELU, layer norms with weights and biases of one eps, a head size it takes."""
        from ..kernels import QuantLinear

        layers = list(parts.layers)
        if not layers or parts.head_dim not in HEAD_SIZES:
            return None
        norms: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        eps = float(layers[0].self_attn_layer_norm.eps)
        for layer in layers:
            for owner, name in PRODUCTS:
                p = getattr(getattr(layer, owner) if owner else layer, name, None)
                if not isinstance(p, QuantLinear) or p.kernel != "native" or p.extra is None or p.bias is not None:
                    return None
                weights += [p.weight, p.scales, p.extra]
            for name in NORMS:
                norm = getattr(layer, name)
                if norm.weight is None or norm.bias is None or float(norm.eps) != eps:
                    return None
                norms += [norm.weight.detach().float().contiguous(), norm.bias.detach().float().contiguous()]
            act = layer.activation_fn
            if type(act).__name__ != "GELUActivation" or getattr(act, "act", None) is not torch.nn.functional.gelu:
                return None
        return cls(norms=norms, weights=weights, uncond=parts.uncond_cross.detach().float().contiguous(),
                   heads=parts.num_heads, ffn=layers[0].fc1.out_features, eps=eps,
                   scaling=float(layers[0].self_attn.scaling))

    def __call__(self, h: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]], xk: list[torch.Tensor],
                 xv: list[torch.Tensor], columns: torch.Tensor, self_bias: torch.Tensor, cross_bias: torch.Tensor,
                 halves: bool) -> torch.Tensor:
        """The layers over rows h (R, D): (R, D) before the final norm. ``kv``: per layer the 8-bit caches (R, H,
        columns, d + 4), written at ``columns`` (R,); ``self_bias`` (R, columns) and ``cross_bias`` (conditional
        rows, prompt) additive float32 masks; ``halves``: guidance, the unconditional rows after the conditional
        ones (else every row is conditional)."""
        return decode_layers(h, self.norms, self.weights, [k for k, _ in kv], [v for _, v in kv], xk, xv,
                             self.uncond, columns, self_bias, cross_bias, self.heads, self.ffn, self.eps,
                             self.scaling, halves)

    def nbytes(self) -> int:
        """What the stack holds of its own (the norms and constants as float32; the weights are the model's)."""
        return sum(t.numel() * t.element_size() for t in (*self.norms, self.uncond))

    def layer(self, i: int) -> "LayerStack":
        """The stack of layer ``i`` alone (views of this one's operands)."""
        return LayerStack(norms=self.norms[6 * i:6 * i + 6], weights=self.weights[18 * i:18 * i + 18],
                          uncond=self.uncond[i:i + 1], heads=self.heads, ffn=self.ffn, eps=self.eps,
                          scaling=self.scaling)

    def works(self, parts: Any) -> bool:
        """Does the stack agree with the model's eager layers (:func:`..step.layer_step`, radio's kernels, the
        8-bit cache) on a probe: each layer alone on random rows over small random caches and prompts, one station
        and two, with guidance? Relative error of each layer's output and key/value write within 5 % (the eager
        layer rounds to bf16 between its ops, the loop does not: ~1 %). Says why where it does not."""
        try:
            error = max(self._probe(parts, stations) for stations in (1, 2))
        except Exception as exc:  # noqa: BLE001 - an op that refuses its inputs: the layers it would have had
            logger.warning("radio's layer loop is off: %s: %s", type(exc).__name__,
                           (str(exc).strip().splitlines() or [""])[0][:300])
            return False
        if not error < 0.05:
            logger.warning("radio's layer loop is off: it disagrees with the eager layers (relative error %.3g on "
                           "a probe)", error)
            return False
        return True

    def _probe(self, parts: Any, stations: int) -> float:
        """The largest relative error, over the layers, of a layer's output and cache write against the eager
        layer's on the same random inputs (each layer alone: the errors of one do not carry into the next)."""
        from ..decoding import kv8_dequantize, kv8_pack
        from ..step import layer_step

        gen = torch.Generator().manual_seed(stations)
        H, d = parts.num_heads, parts.head_dim
        rows, D, W, S = 2 * stations, H * parts.head_dim, PROBE_COLUMNS, PROBE_PROMPT
        column = W // 2
        live = (torch.arange(W) <= column)[None, :].expand(rows, W)
        bias = torch.where(live, 0.0, torch.finfo(torch.float32).min)
        cross = torch.zeros(stations, S)
        cross[0, S - 2:] = torch.finfo(torch.float32).min  # a shorter prompt
        index = torch.arange(rows)
        columns = torch.full_like(index, column)
        errors = []
        with torch.inference_mode():
            for i, module in enumerate(parts.layers):
                h = torch.randn(rows, D, generator=gen).to(torch.bfloat16)
                k, v = (kv8_pack(torch.randn(rows, H, W, d, generator=gen)) for _ in range(2))
                xk, xv = (torch.randn(stations, S, H, d, generator=gen).to(torch.bfloat16).transpose(1, 2)
                          for _ in range(2))
                ek, ev, mk, mv = k.clone(), v.clone(), k.clone(), v.clone()
                want = layer_step(module, h, ek, ev, xk, xv, parts.uncond_cross[i], None, index, columns,
                                  bias.to(torch.bfloat16)[:, None, None, :], cross.to(torch.bfloat16)[:, None, None, :],
                                  "halves", "native").float()
                got = self.layer(i)(h, [(mk, mv)], [xk], [xv], columns, bias, cross, True).float()
                errors.append(float((got - want).norm() / want.norm()))
                for e, m in ((ek, mk), (ev, mv)):
                    a, b = kv8_dequantize(e[:, :, column]), kv8_dequantize(m[:, :, column])
                    errors.append(float((b - a).norm() / a.norm()))
        return max(errors)
