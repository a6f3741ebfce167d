"""The live-column decode attention kernel (Triton; on CPU under Triton's interpreter) against PyTorch."""

from __future__ import annotations

import pytest
import torch

from radio.musicgen import attention

needs_triton = pytest.mark.skipif(not attention.installed() or not (attention.interpreted() or torch.cuda.is_available()),
                                  reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize(("rows", "heads", "window", "dim", "dtype"), [
    (2, 4, 37, 16, torch.float32),  # many splits: most of them empty for short rows
    (6, 2, 300, 32, torch.bfloat16),
    (40, 16, 70, 16, torch.float32),  # enough programs for one split: no combine pass
])
def test_it_attends_to_each_rows_live_columns_only(rows: int, heads: int, window: int, dim: int,
                                                   dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    k, v = (torch.randn(rows, heads, window, dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(rows, heads, dim, generator=g).to(dtype)
    live = torch.randint(1, window + 1, (rows,), generator=g).int()
    live[0] = 1
    want = attention.reference(q, k, v, live, dim ** -0.5)
    k[0, :, 1:] = float("nan")  # what lies past a row's live columns is never read
    got = attention.decode_attention(q, k, v, live, dim ** -0.5)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_splits_fill_the_card_and_stay_a_power_of_two() -> None:
    assert attention.splits_for(2, 16) == 16 and attention.splits_for(256, 16) == 1
    assert all(s & (s - 1) == 0 and 1 <= s <= 32 for s in (attention.splits_for(r, h) for r in range(1, 300, 7)
                                                             for h in (1, 4, 16, 32)))

