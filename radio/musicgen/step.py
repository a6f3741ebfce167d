"""The decode step of the static (slot) path: one function, fixed shapes, no host synchronisation.

Every station on air owns a *slot*: KV buffers of the window's size for its two rows (conditional and
unconditional, for classifier-free guidance), the cross-attention keys and values of its prompt, and a few
per-row registers (tokens in the cache, the column to feed next, the delay pattern's forced warm-up values,
sampling settings). :func:`decode_step` advances the first ``n`` slots by one frame column:

1. embeddings: the sum of the K codebooks' embeddings of the slot's next column, plus the sinusoidal position of
   the row's own next token (every row sees its own BOS at position 0);
2. each decoder layer: self-attention over the row's own live columns (the new key/value is written into the
   slot first; columns past it are masked), cross-attention over the slot's prompt (the unconditional row's text
   states are zeros, so its cross-attention is a constant per layer), feed-forward;
3. the K language-model heads, guidance per row (``uncond + (cond - uncond) * g`` where g > 1), temperature and
   top-k per row, sampling by the Gumbel-max trick from noise drawn before the step, greedy rows by argmax;
4. the delay pattern: during a fresh row's first K-1 steps, the codebooks that still belong to the known
   context are forced;
5. the sampled column is written into the chunk's output codes, and becomes the slot's next column.

Slots not active in this chunk (``active`` false) run along (the shapes are fixed) but write their key/value
into a scratch column (the fused kernels: write nothing and read none of their cache) and keep their registers,
so they continue exactly where they were.

The math is transformers' ``MusicgenForCausalLM`` forward (eager attention) for one token per row; the tests
hold the two to the same codes with greedy settings. The function reads and writes only tensors that live as
long as the slots, so on CUDA it is captured once per batch bucket as a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fused import add_norm, decode_attention
from .sampling import guide, sample


@dataclass
class DecoderParts:
    """The transformers modules the step uses (not copies: the model's own weights). Typed ``Any``: their
    submodules are transformers' (``layer.self_attn.q_proj``...), which ``nn.Module``'s typing cannot name."""

    embed: Any  # nn.ModuleList: K embeddings
    positions: torch.Tensor  # (max_positions, D) sinusoidal table
    layers: Any  # nn.ModuleList of MusicgenDecoderLayer
    final_norm: nn.LayerNorm
    heads: Any  # nn.ModuleList: K lm heads
    uncond_cross: torch.Tensor  # (L, D): each layer's cross-attention output for zero text states
    num_heads: int
    head_dim: int
    qkv: list[torch.Tensor] | None = None  # per layer (3D, D): q, k, v projections as one product (CUDA)
    heads_w: torch.Tensor | None = None  # (K*V, D): the K heads as one product (CUDA)

    @classmethod
    def of(cls, causal_lm: Any, positions: torch.Tensor, fuse_qkv: bool = False) -> "DecoderParts":
        """From a ``MusicgenForCausalLM`` (``model.decoder``). ``fuse_qkv``: one product for the self-attention
        projections instead of three, and one for the K heads (fewer kernels per step; a copy of those weights)."""
        inner = causal_lm.model.decoder
        attn = inner.layers[0].self_attn
        dim = attn.num_heads * attn.head_dim
        p = next(causal_lm.parameters())
        with torch.inference_mode():
            zeros = torch.zeros(1, 1, dim, dtype=p.dtype, device=p.device)
            # Softmax over identical keys is uniform, so the output is out_proj(v_proj(0)) whatever the mask.
            uncond = torch.stack([layer.encoder_attn.out_proj(layer.encoder_attn.v_proj(zeros))[0, 0]
                                  for layer in inner.layers])
            qkv = [torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                              layer.self_attn.v_proj.weight]) for layer in inner.layers] if fuse_qkv else None
            heads_w = torch.cat([head.weight for head in causal_lm.lm_heads]) if fuse_qkv else None
        return cls(embed=inner.embed_tokens, positions=positions, layers=inner.layers, final_norm=inner.layer_norm,
                   heads=causal_lm.lm_heads, uncond_cross=uncond.clone(), num_heads=attn.num_heads,
                   head_dim=attn.head_dim, qkv=qkv, heads_w=heads_w)


@dataclass
class SlotTensors:
    """Everything a slot holds on the device. Row 2*s is slot s's conditional row, 2*s+1 its unconditional twin."""

    k: list[torch.Tensor]  # per layer (slots, 2, H, W, d)
    v: list[torch.Tensor]
    xk: list[torch.Tensor]  # per layer (slots, H, S, d): the prompt's cross-attention keys (conditional row)
    xv: list[torch.Tensor]
    xbias: torch.Tensor  # (slots, S) 0 for prompt tokens, dtype-min for padding
    length: torch.Tensor  # (slots,) int64: tokens in the slot's cache; the next token's position
    next_col: torch.Tensor  # (slots, K) int64: the column the next step feeds
    forced: torch.Tensor  # (slots, K, K) int64: forced[s, k, j] = codebook k at warm-up step j, or -1 (sample)
    warm: torch.Tensor  # (slots,) int64: steps since the slot's last prefill
    active: torch.Tensor  # (slots,) bool
    guidance: torch.Tensor  # (slots,) float32
    temperature: torch.Tensor  # (slots,) float32
    top_k: torch.Tensor  # (slots,) int64
    noise: torch.Tensor  # (slots, K, V) float32 uniform noise in (0, 1), drawn before each step
    out: torch.Tensor  # (slots, K, max_steps) int64: the chunk's sampled columns
    t: torch.Tensor  # () int64: the step within the chunk


def decode_step(parts: DecoderParts, st: SlotTensors, n: int, kmax: int, kernels: str = "eager") -> None:
    """Advance slots ``[0, n)`` by one column in place. ``n`` and ``kmax`` (the largest top-k of the batch) are
    Python ints fixed per captured graph; nothing here reads a tensor's value on the host. ``kernels``: how the
    layers are computed: ``eager`` (transformers' math, op for op), ``sdpa`` (PyTorch's fused attention kernels;
    the self-attention masks the whole window) or ``fused`` (:mod:`.fused`'s kernels: self-attention over each
    row's live columns with the key/value write in it, residual adds fused with the next layer norm;
    cross-attention as ``sdpa``)."""
    finish_step(parts, st, n, kmax, hidden_states(parts, st, n, kernels))


def hidden_states(parts: DecoderParts, st: SlotTensors, n: int, kernels: str = "eager") -> torch.Tensor:
    """Steps 1-2 of :func:`decode_step`: the embeddings of slots ``[0, n)``'s next columns through the decoder
    layers and the final norm (each layer's new key/value written into the slot): (2n, D)."""
    K = len(parts.embed)
    W = st.k[0].shape[3]
    act = st.active[:n]
    tok = st.next_col[:n]
    length = st.length[:n]

    x = parts.embed[0](tok[:, 0])
    for k in range(1, K):
        x = x + parts.embed[k](tok[:, k])
    x = x + parts.positions[length.clamp(max=parts.positions.shape[0] - 1)].to(x.dtype)
    h = x[:, None, :].expand(n, 2, x.shape[-1]).reshape(2 * n, x.shape[-1])

    if kernels == "fused":
        # Each row's live columns with the new one; 0 for a slot sitting out: it reads and writes nothing.
        return _fused_layers(parts, st, n, h, torch.where(act, length + 1, 0).repeat_interleave(2))
    # Where each row writes its new key/value: its next column, or the scratch column W-1 when it sits out.
    pos = torch.where(act, length, torch.full_like(length, W - 1))
    return _layers(parts, st, n, h, pos.repeat_interleave(2), sdpa=kernels == "sdpa")


def finish_step(parts: DecoderParts, st: SlotTensors, n: int, kmax: int, h: torch.Tensor) -> None:
    """Steps 3-5 of :func:`decode_step` from the final hidden states ``h`` (2n, D): the heads, guidance,
    sampling, the delay pattern's forcing, and the sampled column written into the chunk's codes and the
    slots' registers."""
    K = len(parts.embed)
    act = st.active[:n]
    tok = st.next_col[:n]
    if parts.heads_w is not None:
        logits = torch.nn.functional.linear(h, parts.heads_w).float().view(n, 2, K, -1)
    else:
        logits = torch.stack([head(h) for head in parts.heads], dim=1).float().view(n, 2, K, -1)
    logits = guide(logits[:, 0], logits[:, 1], st.guidance[:n])
    col = sample(logits, st.temperature[:n], st.top_k[:n], st.noise[:n], kmax)
    warm = st.warm[:n]
    f = st.forced[:n].gather(2, warm.clamp(max=K - 1)[:, None, None].expand(n, K, 1))[:, :, 0]
    col = torch.where((warm < K - 1)[:, None] & (f >= 0), f, col)

    st.out[:n].index_copy_(2, st.t.view(1), col[:, :, None])
    st.next_col[:n] = torch.where(act[:, None], col, tok)
    st.length[:n] += act.long()
    st.warm[:n] += act.long()
    st.t += 1


def _layers(parts: DecoderParts, st: SlotTensors, n: int, h: torch.Tensor, pos2: torch.Tensor,
            sdpa: bool) -> torch.Tensor:
    """The decoder layers and the final norm with PyTorch's ops: h (2n, D) -> (2n, D)."""
    H, d = parts.num_heads, parts.head_dim
    D = H * d
    W = st.k[0].shape[3]
    dtype = st.k[0].dtype
    rows = torch.arange(2 * n, device=pos2.device)
    cols = torch.arange(W, device=pos2.device)
    self_bias = torch.where(cols[None, :] <= pos2[:, None], 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    cross_bias = st.xbias[:n][:, None, None, :]  # (n,1,1,S)
    h = h[:, None, :]  # (2n, 1, D): one token per row
    for i, layer in enumerate(parts.layers):
        attn = layer.self_attn
        residual = h
        y = layer.self_attn_layer_norm(h)
        kc = st.k[i][:n].view(2 * n, H, W, d)
        vc = st.v[i][:n].view(2 * n, H, W, d)
        q, k_new, v_new = _self_qkv(parts, i, y)
        kc[rows, :, pos2] = k_new
        vc[rows, :, pos2] = v_new
        a = _attend(q[:, :, None, :], kc, vc, self_bias, attn.scaling, sdpa)
        h = residual + attn.out_proj(a.reshape(2 * n, 1, D))

        residual = h
        y = layer.encoder_attn_layer_norm(h).view(n, 2, D)[:, 0]
        c = _cross(parts, st, n, i, y, cross_bias, sdpa=sdpa)
        both = torch.stack([c, parts.uncond_cross[i].expand(n, D)], dim=1)  # (n, 2, D)
        h = residual + both.reshape(2 * n, 1, D)

        residual = h
        y = layer.final_layer_norm(h)
        h = residual + layer.fc2(layer.activation_fn(layer.fc1(y)))
    return parts.final_norm(h)[:, 0]


def _fused_layers(parts: DecoderParts, st: SlotTensors, n: int, h: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """:func:`_layers` with :mod:`.fused`'s kernels: per layer, the attention (which writes the new key/value)
    and three add+norm kernels in place of two index writes, three adds, three norms and a stack. ``live``
    (2n,): each row's columns with the new one, 0 for rows of slots sitting out: they read and write nothing
    (a batch of 200 in the bucket of 208 would otherwise read 8 whole windows a layer for nothing)."""
    H, d = parts.num_heads, parts.head_dim
    W = st.k[0].shape[3]
    live = live.to(torch.int32)
    cross_bias = st.xbias[:n][:, None, None, :]
    layers = list(parts.layers)
    y = layers[0].self_attn_layer_norm(h)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        q, k_new, v_new = _self_qkv(parts, i, y)
        a = decode_attention(q, st.k[i][:n].view(2 * n, H, W, d), st.v[i][:n].view(2 * n, H, W, d), k_new, v_new,
                             live, attn.scaling)
        h, y = add_norm(h, attn.out_proj(a.reshape(2 * n, H * d)), layer.encoder_attn_layer_norm)
        c = _cross(parts, st, n, i, y.view(n, 2, H * d)[:, 0], cross_bias, sdpa=True)
        h, y = add_norm(h, c, layer.final_layer_norm, uncond=parts.uncond_cross[i])
        following = layers[i + 1].self_attn_layer_norm if i + 1 < len(layers) else parts.final_norm
        h, y = add_norm(h, layer.fc2(layer.activation_fn(layer.fc1(y))), following)
    return y  # the final norm's output


def _self_qkv(parts: DecoderParts, i: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention's query, key and value of the new token, each (rows, H, d)."""
    H, d = parts.num_heads, parts.head_dim
    rows = y.shape[0]
    if parts.qkv is not None:
        qkv = torch.nn.functional.linear(y, parts.qkv[i]).view(rows, 3, H, d)
        return qkv[:, 0], qkv[:, 1], qkv[:, 2]
    attn = parts.layers[i].self_attn
    return attn.q_proj(y).view(rows, H, d), attn.k_proj(y).view(rows, H, d), attn.v_proj(y).view(rows, H, d)


def _cross(parts: DecoderParts, st: SlotTensors, n: int, i: int, y: torch.Tensor, bias: torch.Tensor,
           sdpa: bool) -> torch.Tensor:
    """Cross-attention of the conditional rows over their slot's prompt: y (n, D) -> (n, D)."""
    H, d = parts.num_heads, parts.head_dim
    cross = parts.layers[i].encoder_attn
    q = cross.q_proj(y).view(n, H, 1, d)
    a = _attend(q, st.xk[i][:n], st.xv[i][:n], bias, cross.scaling, sdpa)
    return cross.out_proj(a.reshape(n, H * d))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
            sdpa: bool) -> torch.Tensor:
    """Attention of one query per row: (rows, H, 1, d) over (rows, H, cols, d) with an additive mask."""
    if sdpa:  # fused kernels on CUDA
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    w = torch.matmul(q, k.transpose(2, 3)) * scaling + bias  # transformers' eager attention, op for op
    return torch.matmul(torch.softmax(w, dim=-1), v)
