"""The Triton kernels of :mod:`radio.musicgen.attention`, apart so that the package imports where triton is not
installed (PyTorch's CPU builds do not ship it)."""

import triton
import triton.language as tl


@triton.jit
def split_kernel(q_ptr, k_ptr, v_ptr, live_ptr, acc_ptr, m_ptr, l_ptr, out_ptr, scale,
                  s_qr, s_qh, s_kr, s_kh, s_kw,
                  H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    rh = tl.program_id(0)  # row * H + head
    split = tl.program_id(1)
    r = rh // H
    h = rh % H
    n_live = tl.load(live_ptr + r)
    per = tl.cdiv(tl.cdiv(n_live, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, n_live)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + r * s_qr + h * s_qh + d).to(tl.float32) * scale
    base = r * s_kr + h * s_kh
    m = -float("inf")
    l_sum = 0.0
    acc = tl.zeros((D,), tl.float32)
    for c in range(start, end, BLOCK_N):
        cols = c + tl.arange(0, BLOCK_N)
        ok = cols < end
        offs = base + cols[:, None] * s_kw + d[None, :]
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    if SPLITS == 1:
        tl.store(out_ptr + rh * D + d, (acc / l_sum).to(out_ptr.dtype.element_ty))
    else:
        tl.store(acc_ptr + (rh * SPLITS + split) * D + d, acc)
        tl.store(m_ptr + rh * SPLITS + split, m)
        tl.store(l_ptr + rh * SPLITS + split, l_sum)


@triton.jit
def combine_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
    rh = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + rh * SPLITS + s)
    w = tl.exp(m - tl.max(m, axis=0))  # an empty split (m = -inf) weighs 0
    total = tl.sum(w * tl.load(l_ptr + rh * SPLITS + s), axis=0)
    acc = tl.load(acc_ptr + (rh * SPLITS + s)[:, None] * D + d[None, :])
    out = tl.sum(w[:, None] * acc, axis=0) / total
    tl.store(out_ptr + rh * D + d, out.to(out_ptr.dtype.element_ty))
