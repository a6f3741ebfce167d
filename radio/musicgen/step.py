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

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import native
from .decoding import kv8_pack, kv8_unpack
from .fused import add_norm, decode_attention
from .sampling import guide, sample

logger = logging.getLogger(__name__)


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
    native: bool = False  # the dynamic path attends over an 8-bit cache with radio's CPU kernel (.native)
    stack: Any = None  # the dynamic path's layers as one call of radio's kernels (.native.layers.LayerStack)

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
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)  # an 8-bit cache's upcasts (eager kernels)


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
    W, kd = st.k[0].shape[3], st.k[0].shape[4]  # kd: head_dim, or head_dim + 4 in an 8-bit cache
    H = parts.num_heads
    act = st.active[:n]
    length = st.length[:n]
    x = embed(parts, st.next_col[:n], length)
    h = x[:, None, :].expand(n, 2, x.shape[-1]).reshape(2 * n, x.shape[-1])

    if kernels == "fused":
        # Each row's live columns with the new one; 0 for a slot sitting out: it reads and writes nothing.
        return _fused_layers(parts, st, n, h, torch.where(act, length + 1, 0).repeat_interleave(2))
    # Where each row writes its new key/value: its next column, or the scratch column W-1 when it sits out.
    pos2 = torch.where(act, length, torch.full_like(length, W - 1)).repeat_interleave(2)
    cols = torch.arange(W, device=pos2.device)
    dtype = h.dtype  # the activations' (an 8-bit cache's is int8)
    self_bias = torch.where(cols[None, :] <= pos2[:, None], 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    at = WriteAt(torch.arange(2 * n, device=pos2.device), pos2, self_bias, st.xbias[:n][:, None, None, :], "paired")

    def caches(i: int) -> LayerCaches:  # slot s: rows 2s (conditional), 2s+1 (unconditional)
        return (st.k[i][:n].view(2 * n, H, W, kd), st.v[i][:n].view(2 * n, H, W, kd), st.xk[i][:n], st.xv[i][:n])

    return run_layers(parts, h, caches, at, "sdpa" if kernels == "sdpa" else "eager", scratch=st.scratch)


def embed(parts: DecoderParts, tok: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Step 1: the sum of the K codebooks' embeddings of each row's column ``tok`` (rows, K), plus the sinusoidal
    embedding of the row's own position (rows,): (rows, D)."""
    x = parts.embed[0](tok[:, 0])
    for k in range(1, len(parts.embed)):
        x = x + parts.embed[k](tok[:, k])
    return x + parts.positions[positions.clamp(min=0, max=parts.positions.shape[0] - 1)].to(x.dtype)


def logits_of(parts: DecoderParts, h: torch.Tensor) -> torch.Tensor:
    """The K language-model heads over the final hidden states h (rows, D): float logits (rows, K, V)."""
    rows = h.shape[0]
    if parts.heads_w is not None:
        return torch.nn.functional.linear(h, parts.heads_w).float().view(rows, len(parts.heads), -1)
    return torch.stack([head(h) for head in parts.heads], dim=1).float()


def cross_kv(parts: DecoderParts, layer: int, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's cross-attention keys and values in ``layer``: states (n, S, D) -> each (n, H, S, d)."""
    attn = parts.layers[layer].encoder_attn
    n, S, _ = states.shape
    return (attn.k_proj(states).view(n, S, parts.num_heads, -1).transpose(1, 2),
            attn.v_proj(states).view(n, S, parts.num_heads, -1).transpose(1, 2))


@dataclass
class RowCross:
    """The dynamic layout's prompts for one chunk: per layer the conditional rows' cross-attention keys and
    values (B, H, S, d), and their mask as an additive bias (B, 1, 1, S)."""

    xk: list[torch.Tensor]
    xv: list[torch.Tensor]
    bias: torch.Tensor

    @classmethod
    def of(cls, parts: DecoderParts, states: torch.Tensor, mask: torch.Tensor) -> "RowCross":
        """From the rows' text states (B, S, D) and mask (B, S) (1 = a prompt token)."""
        with torch.inference_mode():
            pairs = [cross_kv(parts, i, states) for i in range(len(parts.layers))]
        bias = torch.where(mask.bool(), 0.0, torch.finfo(states.dtype).min).to(states.dtype)[:, None, None, :]
        return cls([k for k, _ in pairs], [v for _, v in pairs], bias)


def row_logits(parts: DecoderParts, kv: list[tuple[torch.Tensor, torch.Tensor]], tok: torch.Tensor,
               offsets: torch.Tensor, length: int, prompts: RowCross, cfg: bool,
               scratch: dict[str, torch.Tensor] | None = None, layer: "LayerFn | None" = None) -> torch.Tensor:
    """One decode step of the dynamic layout (``decoding.DecodeState``): B rows, each feeding its next column
    ``tok`` (B, K), left-padded by ``offsets`` (B,), over per-layer buffers (physical rows, H, capacity, d) that
    hold ``length`` columns; with guidance (``cfg``) physical row B + i is row i's unconditional twin. Each
    layer's new key/value is written at column ``length``, and attention reads the whole buffer (a slice would
    not be contiguous, which costs a CPU matmul a copy of its operand) with the columns outside
    ``[offset, length]`` masked. Returns the float logits (physical rows, K, V). An 8-bit cache (int8 buffers of
    ``decoding.kv8_pack``ed rows) is read by :func:`_attend8`, with ``scratch`` its upcast buffers. ``layer``: the
    function that runs one layer (:func:`layer_step`, or a compiled copy of it: :mod:`.compiled`); where the
    model has radio's layer loop (``parts.stack``: :mod:`.native.layers`) it runs them all instead.

    The same layers as the slot path's step (:func:`run_layers`), so the two are one decode step over two KV
    layouts."""
    B = tok.shape[0]
    mult = 2 if cfg else 1
    phys_offsets = offsets.repeat(mult)
    x = embed(parts, tok, length - offsets)
    h = x.repeat(mult, 1)
    capacity = kv[0][0].shape[2]
    dtype = h.dtype
    cols = torch.arange(capacity, device=tok.device)
    live = (cols[None, :] >= phys_offsets[:, None]) & (cols[None, :] <= length)
    rows = torch.arange(B * mult, device=tok.device)
    stack = parts.stack
    if stack is not None and stack.failed is None:
        try:
            h_all = stack(h, kv, prompts.xk, prompts.xv, torch.full_like(rows, length),
                          torch.where(live, 0.0, torch.finfo(torch.float32).min), prompts.bias.reshape(B, -1).float(),
                          cfg)
            return logits_of(parts, parts.final_norm(h_all))
        except RuntimeError as exc:  # the layers below write the step's keys and values again
            stack.failed = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            logger.warning("radio's layer loop failed (%s); this model runs its layers one by one from now on",
                           stack.failed)
    self_bias = torch.where(live, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    at = WriteAt(rows, torch.full_like(rows, length), self_bias, prompts.bias, "halves" if cfg else "conditional")

    def caches(i: int) -> LayerCaches:  # rows [0, B) conditional, [B, 2B) unconditional
        return (kv[i][0], kv[i][1], prompts.xk[i], prompts.xv[i])

    return logits_of(parts, run_layers(parts, h, caches, at, "native" if parts.native else "eager", scratch=scratch,
                                       layer=layer))


def finish_step(parts: DecoderParts, st: SlotTensors, n: int, kmax: int, h: torch.Tensor) -> None:
    """Steps 3-5 of :func:`decode_step` from the final hidden states ``h`` (2n, D): the heads, guidance,
    sampling, the delay pattern's forcing, and the sampled column written into the chunk's codes and the
    slots' registers."""
    K = len(parts.embed)
    act = st.active[:n]
    tok = st.next_col[:n]
    logits = logits_of(parts, h).view(n, 2, K, -1)
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


LayerCaches = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class WriteAt:
    """Where a step's rows write their new keys and values and what they attend: row ``rows[j]`` writes at column
    ``columns[j]`` of its layer cache, and reads it with ``self_bias`` (rows, 1, 1, columns) added; the prompts'
    cross-attention with ``cross_bias`` (conditional rows, 1, 1, S). ``guidance``: where the conditional rows are:
    ``paired`` (rows 2s and 2s+1: the slots), ``halves`` (the first half, the unconditional twins after them: the
    dynamic layout with guidance) or ``conditional`` (every row, no guidance)."""

    rows: torch.Tensor
    columns: torch.Tensor
    self_bias: torch.Tensor
    cross_bias: torch.Tensor
    guidance: str


LayerFn = Callable[..., torch.Tensor]


def run_layers(parts: DecoderParts, h: torch.Tensor, caches: Callable[[int], LayerCaches], at: WriteAt, kernels: str,
               scratch: dict[str, torch.Tensor] | None = None, layer: LayerFn | None = None) -> torch.Tensor:
    """Step 2, the decoder layers and the final norm: h (rows, D) -> (rows, D), one new token per row. The KV
    layout comes in as ``caches(i)``: layer i's self-attention cache (rows, H, columns, d), written at ``at``, and
    the conditional rows' prompt keys and values (n, H, S, d). ``layer`` runs one layer (:func:`layer_step`, or a
    compiled copy of it); the eager layer reads an 8-bit cache through ``scratch`` upcast buffers, a compiled one
    dequantizes inside its attention loop. ``kernels``: as :func:`layer_step` takes it."""
    eight_bit = caches(0)[0].dtype == torch.int8
    run = layer_step if layer is None else layer
    for i, module in enumerate(parts.layers):
        kc, vc, xk, xv = caches(i)
        extra = {"scratch": scratch if scratch is not None else {}} if eight_bit and layer is None else {}  # eager
        qkv = parts.qkv[i] if parts.qkv is not None else None
        h = run(module, h, kc, vc, xk, xv, parts.uncond_cross[i], qkv, at.rows, at.columns, at.self_bias,
                at.cross_bias, at.guidance, kernels, **extra)
    return parts.final_norm(h)


def layer_step(layer: Any, h: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               uncond: torch.Tensor, qkv: torch.Tensor | None, rows: torch.Tensor, columns: torch.Tensor,
               self_bias: torch.Tensor, cross_bias: torch.Tensor, guidance: str, kernels: str,
               scratch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """One decoder layer (a transformers ``MusicgenDecoderLayer``'s weights, its eager math op for op) for one
    new token per row: h (rows, D) -> (rows, D). The new key/value goes into the cache kc, vc (rows, H, columns,
    d) at ``(rows, columns)`` (:class:`WriteAt`), packed when the cache is 8-bit (read through ``scratch``
    upcast buffers, or none when compiled: :func:`_attend8`); ``uncond`` is the layer's cross-attention output
    for the unconditional rows; ``qkv`` the self-attention's three projections as one weight
    (:class:`DecoderParts`), if made; a self-attention with a ``qkv_proj`` (radio's quantized kernels:
    :func:`.kernels.join_projections`) calls that one product in place of the three. ``kernels``: ``eager``
    (transformers' math), ``sdpa`` (PyTorch's fused attention: CUDA) or ``native`` (an 8-bit cache read by radio's
    CPU kernel, :mod:`.native`; a full cache as eager). Tensors and constants only, so that one compiled copy
    serves every layer."""
    sdpa = kernels == "sdpa"
    attn = layer.self_attn
    H, d = attn.num_heads, attn.head_dim
    n_rows = h.shape[0]
    residual = h
    y = layer.self_attn_layer_norm(h)
    joined = getattr(attn, "qkv_proj", None)  # radio's quantized kernels: the three as one (kernels.py)
    if qkv is not None:
        q, k_new, v_new = torch.nn.functional.linear(y, qkv).view(n_rows, 3, H * d).unbind(1)
    elif joined is not None:
        q, k_new, v_new = joined(y).view(n_rows, 3, H * d).unbind(1)
    else:
        q, k_new, v_new = attn.q_proj(y), attn.k_proj(y), attn.v_proj(y)
    k_new, v_new = k_new.reshape(n_rows, H, d), v_new.reshape(n_rows, H, d)
    if kc.dtype == torch.int8:
        kc[rows, :, columns] = kv8_pack(k_new)
        vc[rows, :, columns] = kv8_pack(v_new)
        if kernels == "native":
            a = native.attend8(q.reshape(n_rows, H, d), kc, vc, self_bias.reshape(n_rows, -1), attn.scaling)
        else:
            a = _attend8(q.reshape(n_rows, H, 1, d), kc, vc, self_bias, attn.scaling, scratch)
    else:
        kc[rows, :, columns] = k_new
        vc[rows, :, columns] = v_new
        a = _attend(q.reshape(n_rows, H, 1, d), kc, vc, self_bias, attn.scaling, sdpa)
    h = residual + attn.out_proj(a.reshape(n_rows, H * d))

    residual = h
    y = layer.encoder_attn_layer_norm(h)
    n = n_rows // 2 if guidance != "conditional" else n_rows
    cond = y.view(n, 2, H * d)[:, 0] if guidance == "paired" else y[:n]
    c = _cross_attention(layer.encoder_attn, xk, xv, cond, cross_bias, sdpa)
    if guidance == "paired":
        c = torch.stack([c, uncond.expand(n, H * d)], dim=1).reshape(n_rows, H * d)
    elif guidance == "halves":
        c = torch.cat([c, uncond.expand(n, H * d)])
    h = residual + c

    residual = h
    y = layer.final_layer_norm(h)
    return residual + layer.fc2(layer.activation_fn(layer.fc1(y)))


def _fused_layers(parts: DecoderParts, st: SlotTensors, n: int, h: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """:func:`run_layers` with :mod:`.fused`'s kernels: per layer, the attention (which writes the new key/value)
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
        kd = st.k[i].shape[4]  # head_dim, or head_dim + 4 in an 8-bit cache
        a = decode_attention(q, st.k[i][:n].view(2 * n, H, W, kd), st.v[i][:n].view(2 * n, H, W, kd), k_new,
                             v_new, live, attn.scaling)
        h, y = add_norm(h, attn.out_proj(a.reshape(2 * n, H * d)), layer.encoder_attn_layer_norm)
        c = _cross_attention(layer.encoder_attn, st.xk[i][:n], st.xv[i][:n], y.view(n, 2, H * d)[:, 0], cross_bias,
                             sdpa=True)
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


def _cross_attention(cross: Any, xk: torch.Tensor, xv: torch.Tensor, y: torch.Tensor, bias: torch.Tensor,
                     sdpa: bool) -> torch.Tensor:
    """A layer's cross-attention (``cross``: its ``encoder_attn``) of the conditional rows over their prompts'
    keys and values xk, xv (n, H, S, d): y (n, D) -> (n, D)."""
    H, d = cross.num_heads, cross.head_dim
    n = y.shape[0]
    q = cross.q_proj(y).view(n, H, 1, d)
    a = _attend(q, xk, xv, bias, cross.scaling, sdpa)
    return cross.out_proj(a.reshape(n, H * d))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
            sdpa: bool) -> torch.Tensor:
    """Attention of one query per row: (rows, H, 1, d) over (rows, H, cols, d) with an additive mask."""
    if sdpa:  # fused kernels on CUDA
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scaling)
    w = torch.matmul(q, k.transpose(2, 3)) * scaling + bias  # transformers' eager attention, op for op
    return torch.matmul(torch.softmax(w, dim=-1), v)


def _attend8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scaling: float,
             scratch: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """:func:`_attend` over an 8-bit cache (``decoding.kv8_pack``): the int8 numbers upcast to float32 (on a CPU
    its float32 matmuls of one query run as fast as its bf16 ones, and the cache is half the bytes to read), each
    token's key scale applied to its score and its value scale folded into its attention weight. Eagerly the
    upcasts go into ``scratch`` buffers kept from call to call (fresh ones of this size are new pages every time);
    with ``scratch`` None (the compiled layer, :mod:`.compiled`) they are plain expressions, which the compiler
    fuses into one pass that reads each int8 column and its scale once."""
    kq, ks = kv8_unpack(k)
    vq, vs = kv8_unpack(v)
    if scratch is None:
        kf, vf = kq.float(), vq.float()
    else:
        kf, vf = _scratch(scratch, "k", kq.shape, k.device), _scratch(scratch, "v", vq.shape, v.device)
        kf.copy_(kq)
        vf.copy_(vq)
    w = torch.matmul(q.float(), kf.transpose(2, 3)) * (ks.transpose(2, 3) * scaling) + bias.float()
    p = torch.softmax(w, dim=-1) * vs.transpose(2, 3)
    return torch.matmul(p, vf).to(q.dtype)


def _scratch(scratch: dict[str, torch.Tensor], name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The float32 buffer ``name`` of ``shape`` in ``scratch``: one per shape, never replaced, so a graph captured
    for one batch size keeps its own (the slots: a few buckets); the dynamic path, whose buffers change size
    every chunk, clears its dict at each chunk."""
    key = f"{name}{tuple(shape)}"
    t = scratch.get(key)
    if t is None:
        t = scratch[key] = torch.empty(shape, dtype=torch.float32, device=device)
    return t

