"""The GPU step's fused kernels (Triton; on CPU under Triton's interpreter) against PyTorch."""

from __future__ import annotations

import pytest
import torch

from radio.musicgen import fused

needs_triton = pytest.mark.skipif(not fused.installed() or not (fused.interpreted() or torch.cuda.is_available()),
                                  reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize(("rows", "heads", "window", "dim", "dtype"), [
    (2, 4, 37, 16, torch.float32),  # many splits: most of them empty for short rows
    (6, 2, 300, 32, torch.bfloat16),
    (40, 16, 70, 16, torch.float32),  # enough programs for one split: no combine pass
])
def test_attention_reads_each_rows_live_columns_and_writes_the_new_one(rows: int, heads: int, window: int, dim: int,
                                                                      dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    k, v = (torch.randn(rows, heads, window, dim, generator=g).to(dtype) for _ in range(2))
    q, k_new, v_new = (torch.randn(rows, heads, dim, generator=g).to(dtype) for _ in range(3))
    live = torch.randint(1, window + 1, (rows,), generator=g).int()
    live[0] = 1
    live[-1] = 0  # a slot sitting the step out: reads and writes nothing, attends to nothing
    k_want, v_want = k.clone(), v.clone()
    want = fused.reference(q, k_want, v_want, k_new, v_new, live, dim ** -0.5)
    k[0, :, 1:] = float("nan")  # what lies past a row's live columns is never read...
    k_want[0, :, 1:] = float("nan")
    for r in range(rows - 1):  # ...nor is the new column read back from the cache
        k[r, :, live[r] - 1] = float("nan")
        v[r, :, live[r] - 1] = float("nan")
    k[-1], v[-1] = float("nan"), float("nan")  # nor anything of a row that sits out
    k_want[-1], v_want[-1] = float("nan"), float("nan")
    got = fused.decode_attention(q, k, v, k_new, v_new, live, dim ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    assert (got[-1] == 0).all()
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    # the new key and value are in the cache at each row's last live column, and nothing else changed
    torch.testing.assert_close(k, k_want, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(v, v_want, equal_nan=True, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize(("dim", "dtype"), [(64, torch.float32), (96, torch.bfloat16)])
def test_add_norm_is_the_residual_add_then_the_layer_norm(paired: bool, dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(dim)
    rows = 6
    norm = torch.nn.LayerNorm(dim, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g))
        norm.bias.copy_(torch.randn(dim, generator=g))
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    delta = torch.randn(rows // 2 if paired else rows, dim, generator=g).to(dtype)
    uncond = torch.randn(dim, generator=g).to(dtype) if paired else None
    with torch.inference_mode():
        h, y = fused.add_norm(x, delta, norm, uncond)
        h_want, y_want = fused.add_norm_reference(x, delta, norm, uncond)  # paired: row 2i + delta[i], 2i+1 + uncond
    # the add rounds as PyTorch's does (on the GPU; Triton's interpreter truncates to bfloat16: one unit apart)
    exact = dtype == torch.float32
    torch.testing.assert_close(h, h_want, atol=0, rtol=0 if exact else 2 ** -7)
    torch.testing.assert_close(y.float(), y_want.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_splits_fill_the_card_and_stay_a_power_of_two() -> None:
    assert fused.splits_for(2, 16) == 16 and fused.splits_for(256, 16) == 1
    assert all(s & (s - 1) == 0 and 1 <= s <= 32 for s in (fused.splits_for(r, h) for r in range(1, 300, 7)
                                                           for h in (1, 4, 16, 32)))


@needs_triton
@pytest.mark.parametrize(("rows", "heads", "window", "dim", "dtype"), [
    (2, 4, 37, 16, torch.float32),
    (6, 2, 130, 32, torch.bfloat16),
])
def test_attention_over_an_8bit_cache_quantizes_the_new_column_and_dequantizes_the_rest(
        rows: int, heads: int, window: int, dim: int, dtype: torch.dtype) -> None:
    """The int8 cache (decoding.kv8_pack's rows: numbers, then the float32 scale): the kernel writes the new
    key/value exactly as kv8_pack would, and attends like the reference over the dequantized columns."""
    from radio.musicgen.decoding import kv8_dequantize, kv8_pack

    g = torch.Generator().manual_seed(rows + 10)
    k, v = (kv8_pack(torch.randn(rows, heads, window, dim, generator=g)) for _ in range(2))
    q, k_new, v_new = (torch.randn(rows, heads, dim, generator=g).to(dtype) for _ in range(3))
    live = torch.randint(1, window + 1, (rows,), generator=g).int()
    live[-1] = 0
    k_want, v_want = k.clone(), v.clone()
    want = fused.reference(q, k_want, v_want, k_new, v_new, live, dim ** -0.5)
    got = fused.decode_attention(q, k, v, k_new, v_new, live, dim ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype and (got[-1] == 0).all()
    assert torch.equal(k, k_want) and torch.equal(v, v_want)  # the new columns, bytes and scales alike
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    # the reference itself: attention over the dequantized cache is close to the full-precision one
    full = fused.reference(q, kv8_dequantize(k_want), kv8_dequantize(v_want), k_new, v_new, live, dim ** -0.5)
    torch.testing.assert_close(want.float(), full.float(), atol=0.05, rtol=0.05)
