"""The Triton kernels of :mod:`radio.musicgen.fused`, apart so that the package imports where triton is not
installed (PyTorch's CPU builds do not ship it)."""

import triton
import triton.language as tl


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, kn_ptr, vn_ptr, live_ptr, acc_ptr, m_ptr, l_ptr, out_ptr, scale,
                 s_qr, s_qh, s_kr, s_kh, s_kw, s_nr, s_nh,
                 H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
                 KV8: tl.constexpr):
    """One (row, head, split): attention of the row's query over its share of the live columns. The last live
    column is the step's new key/value, read from ``kn``/``vn`` (never from the cache, so no program reads what
    another writes) and stored into the cache by split 0. A row with no live columns (a slot sitting the step
    out) reads and writes nothing; its output is zeros. KV8: the cache is int8, each row of D numbers followed
    by its float32 scale in 4 bytes (``decoding.kv8_pack``); the new key/value are quantized as they are
    stored, and every column is dequantized as it is read."""
    rh = tl.program_id(0)  # row * H + head
    split = tl.program_id(1)
    r = rh // H
    h = rh % H
    n_live = tl.load(live_ptr + r)
    pos = n_live - 1
    per = tl.cdiv(tl.cdiv(n_live, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, n_live)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + r * s_qr + h * s_qh + d).to(tl.float32) * scale
    k_new = tl.load(kn_ptr + r * s_nr + h * s_nh + d)
    v_new = tl.load(vn_ptr + r * s_nr + h * s_nh + d)
    base = r * s_kr + h * s_kh
    if KV8:
        k_new, k_scale = _quantized(k_new.to(tl.float32))
        v_new, v_scale = _quantized(v_new.to(tl.float32))
        if (split == 0) & (n_live > 0):
            tl.store(k_ptr + base + pos * s_kw + d, k_new.to(tl.int8))
            tl.store(v_ptr + base + pos * s_kw + d, v_new.to(tl.int8))
            tl.store((k_ptr + base + pos * s_kw + D).to(tl.pointer_type(tl.float32)), k_scale)
            tl.store((v_ptr + base + pos * s_kw + D).to(tl.pointer_type(tl.float32)), v_scale)
        k_new = k_new * k_scale  # as the cache holds it
        v_new = v_new * v_scale
    else:
        if (split == 0) & (n_live > 0):
            tl.store(k_ptr + base + pos * s_kw + d, k_new.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + base + pos * s_kw + d, v_new.to(v_ptr.dtype.element_ty))
        k_new = k_new.to(k_ptr.dtype.element_ty).to(tl.float32)  # as the cache holds it
        v_new = v_new.to(v_ptr.dtype.element_ty).to(tl.float32)
    m = -float("inf")
    l_sum = 0.0
    acc = tl.zeros((D,), tl.float32)
    for c in range(start, end, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        ok = cols < end
        cached = ok & (cols != pos)
        new = (cols == pos)[:, None]
        offs = base + cols[:, None] * s_kw + d[None, :]
        k = tl.load(k_ptr + offs, mask=cached[:, None], other=0).to(tl.float32)
        if KV8:
            k = k * _scales(k_ptr, base, cols, s_kw, D, cached)[:, None]
        k = tl.where(new, k_new[None, :], k)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + offs, mask=cached[:, None], other=0).to(tl.float32)
        if KV8:
            v = v * _scales(v_ptr, base, cols, s_kw, D, cached)[:, None]
        v = tl.where(new, v_new[None, :], v)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    if SPLITS == 1:  # l_sum >= 1 when any column was read (the largest score adds exp(0)); 0 when none was
        tl.store(out_ptr + rh * D + d, (acc / tl.maximum(l_sum, 1.0)).to(out_ptr.dtype.element_ty))
    else:
        tl.store(acc_ptr + (rh * SPLITS + split) * D + d, acc)
        tl.store(m_ptr + rh * SPLITS + split, m)
        tl.store(l_ptr + rh * SPLITS + split, l_sum)


@triton.jit
def _quantized(x):
    """A row of numbers as int8 values (still float32) and its float32 scale, as ``decoding.kv8_pack``."""
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-12)
    return tl.minimum(tl.maximum(tl.floor(x / s + 0.5), -127.0), 127.0), s


@triton.jit
def _scales(ptr, base, cols, s_kw, D: tl.constexpr, mask):
    """The float32 scales stored after the D int8 numbers of each of ``cols``' rows."""
    return tl.load((ptr + base + cols * s_kw + D).to(tl.pointer_type(tl.float32)), mask=mask, other=0.0)


@triton.jit
def combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
    rh = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + rh * SPLITS + s)
    top = tl.max(m, axis=0)
    top = tl.where(top == -float("inf"), 0.0, top)  # a row with no live columns: every split empty
    w = tl.exp(m - top)  # an empty split (m = -inf) weighs 0
    total = tl.sum(w * tl.load(l_ptr + rh * SPLITS + s), axis=0)  # >= 1 unless every split was empty
    acc = tl.load(acc_ptr + (rh * SPLITS + s)[:, None] * D + d[None, :])
    out = tl.sum(w[:, None] * acc, axis=0) / tl.maximum(total, 1.0)
    tl.store(out_ptr + rh * D + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def add_norm_kernel(x_ptr, delta_ptr, u_ptr, w_ptr, b_ptr, h_ptr, y_ptr, eps, s_x, s_delta,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, PAIRED: tl.constexpr):
    """One row: ``h = x + delta`` (rounded to x's dtype, as PyTorch's add is), ``y = layer_norm(h)``.
    PAIRED: rows come in (conditional, unconditional) pairs; the conditional row 2i adds ``delta[i]``, the
    unconditional row adds the vector ``u``."""
    r = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    inside = d < D
    x = tl.load(x_ptr + r * s_x + d, mask=inside, other=0.0).to(tl.float32)
    if PAIRED:
        if r % 2 == 0:
            delta = tl.load(delta_ptr + (r // 2) * s_delta + d, mask=inside, other=0.0).to(tl.float32)
        else:
            delta = tl.load(u_ptr + d, mask=inside, other=0.0).to(tl.float32)
    else:
        delta = tl.load(delta_ptr + r * s_delta + d, mask=inside, other=0.0).to(tl.float32)
    h = (x + delta).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + r * D + d, h, mask=inside)
    hf = h.to(tl.float32)
    mean = tl.sum(hf, axis=0) / D
    centred = tl.where(inside, hf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / D
    w = tl.load(w_ptr + d, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + d, mask=inside, other=0.0).to(tl.float32)
    y = centred * tl.rsqrt(var + eps) * w + b
    tl.store(y_ptr + r * D + d, y.to(y_ptr.dtype.element_ty), mask=inside)
