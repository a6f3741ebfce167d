"""Packed oneDNN linear layers: same numbers as the stock layers, used by the engine's model when available."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radio.musicgen.kernels import PackedLinear, accelerate, pack_linears, packing_works, row_bucket
from radio.native import KERNEL_CACHE_VARIABLES, trim
from radio.tools.bench import RssSampler
from radio.config import Sampling
from radio.musicgen.model import ContinuationRequest, MusicgenModel

pytestmark = pytest.mark.skipif(not packing_works(torch.float32), reason="this PyTorch build has no oneDNN linear")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [5, 35])  # 35 rows are padded to 36
def test_packed_linear_equals_linear(dtype: torch.dtype, bias: bool, batch: int) -> None:
    if not packing_works(dtype):
        pytest.skip(f"no oneDNN linear for {dtype} here")
    torch.manual_seed(1)
    dense = nn.Linear(96, 40, bias=bias).to(dtype)
    x = torch.randn(batch, 1, 96).to(dtype)
    with torch.no_grad():
        want, got = dense(x).float(), PackedLinear(dense)(x).float()
    assert got.shape == want.shape == (batch, 1, 40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10)


def test_row_buckets_are_few_and_pad_by_under_an_eighth() -> None:
    sizes = [row_bucket(m) for m in range(1, 65537)]
    assert sizes[:16] == list(range(1, 17))
    assert all(m <= b < m * 9 / 8 for m, b in zip(range(1, 65537), sizes))
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 16 + 8 * 12  # 8 per doubling above 16


def test_new_row_counts_do_not_grow_memory_for_good() -> None:
    """oneDNN keeps a compiled primitive per GEMM shape (about 0.56 MB in its two caches): 600 row counts, each
    its own shape, held ~330 MB until the process ended. Padded to row buckets they are 42 shapes."""
    layer = PackedLinear(nn.Linear(40, 24))  # a shape no other test uses, so its primitives are new here
    with torch.inference_mode():
        layer(torch.randn(16, 40))
        trim()
        before = RssSampler.rss()
        for rows in range(17, 617):
            layer(torch.randn(rows, 40))
        trim()
        grown = (RssSampler.rss() - before) / 2**20
    assert grown < 120, f"RSS grew {grown:.0f} MB over 600 row counts"
    assert len({row_bucket(m) for m in range(17, 617)}) == 42


def test_pack_linears_replaces_every_linear_in_place() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2, bias=False)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = net(x)
        assert pack_linears(net) == 3
        got = net(x)
    assert not any(type(m) is nn.Linear for m in net.modules())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_accelerate_leaves_other_devices_alone() -> None:
    net = nn.Sequential(nn.Linear(8, 8))
    assert accelerate(net, "cuda", torch.float32) is False
    assert type(net[0]) is nn.Linear


def test_engine_model_is_packed_and_agrees_with_the_stock_model(tiny_model_dir: Path) -> None:
    packed = MusicgenModel(str(tiny_model_dir), dtype="float32", seed=0)
    stock = MusicgenModel(str(tiny_model_dir), dtype="float32", seed=0, fast_kernels=False)
    assert packed.packed and not stock.packed
    assert not any(type(m) is nn.Linear for m in packed.model.decoder.modules())
    assert any(type(m) is nn.Linear for m in stock.model.decoder.modules())
    # The whole decode loop (prefill, cached steps, guidance) gives the same logits either way.
    states = packed.encode_text("packed check")[None]
    ids = torch.randint(0, packed.vocab_size, (packed.num_codebooks, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        a = packed.model.decoder(input_ids=ids, encoder_hidden_states=states).logits
        b = stock.model.decoder(input_ids=ids, encoder_hidden_states=stock.encode_text("packed check")[None]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # And greedy continuation codes match the stock model's.
    rng = np.random.default_rng(0)
    context = rng.integers(0, packed.vocab_size, (packed.num_codebooks, 30))
    greedy = Sampling(temperature=0.0, top_k=1, guidance=3.0)
    reqs = [ContinuationRequest(context, "packed check", greedy, key="a")]
    got = packed.continue_batch(reqs, 16)[0].codes
    want = stock.continue_batch(reqs, 16)[0].codes
    np.testing.assert_array_equal(got, want)


def test_bounded_kernel_caches_keep_changing_attention_shapes_from_growing_memory() -> None:
    """CPU bf16 attention (eager matmuls) compiles a oneDNN kernel per KV width: 300 widths held ~330 MB with
    the default caches. The daemon bounds them before its first model runs; a fresh process, as the daemon."""
    script = (
        "import torch\n"
        "from radio.native import bound_kernel_caches, trim\n"
        "from radio.tools.bench import RssSampler\n"
        "bound_kernel_caches()\n"
        "q = torch.randn(6, 4, 1, 16, dtype=torch.bfloat16)\n"
        "torch.matmul(q, torch.randn(6, 4, 16, 50, dtype=torch.bfloat16)); trim(); before = RssSampler.rss()\n"
        "for width in range(100, 400):\n"
        "    w = torch.matmul(q, torch.randn(6, 4, 16, width, dtype=torch.bfloat16))\n"
        "    torch.matmul(torch.softmax(w, -1), torch.randn(6, 4, width, 16, dtype=torch.bfloat16))\n"
        "trim(); print((RssSampler.rss() - before) / 2**20)\n")
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    grown = float(out.stdout.strip().splitlines()[-1])
    assert grown < 120, f"RSS grew {grown:.0f} MB over 300 attention widths"


def decoder_logits(m: MusicgenModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return m.model.decoder(input_ids=ids, encoder_hidden_states=m.encode_text("quantized check")[None]
                               .to(m.dtype)).logits.float()


def scales_of(layer: nn.Module) -> torch.Tensor:
    """A quantized layer's scales, as a tensor to change in place (radio's 4-bit layout holds them in the weight's
    stream: each group's first 32 bytes, bf16)."""
    if layer.kernel == "native" and layer.bits == 4:
        return layer.weight[:, :, :32].view(torch.bfloat16)
    return layer.scales


@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("weights, bound", [("int8", 0.05), ("int4", 0.35)])
def test_quantized_weights_stay_within_a_bound_of_the_dense_model(tiny_model_dir: Path, weights: str,
                                                                  bound: float, kernels: str) -> None:
    """Weight-only int8/int4 on the tiny model, with PyTorch's kernels and radio's own (``auto``: where this
    CPU has them), against the same model with dense bf16 weights: the decoder's logits over a sequence stay
    within ``bound`` (relative), and a layer whose scales are wrong breaks it."""
    from radio.musicgen import native
    from radio.musicgen.kernels import QuantLinear

    if kernels == "auto" and not native.available():
        pytest.skip(f"radio's CPU kernels are off here: {native.why_not()}")
    dense = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, compile="never")
    quant = MusicgenModel(str(tiny_model_dir), weights=weights, seed=0, compile="never", kernels=kernels)
    assert quant.weights == weights and dense.weights == "bfloat16"
    suffix = " (radio's VNNI kernels), radio's layer loop" if kernels == "auto" else ""
    assert quant.describe()["weights"] == weights and quant.describe()["kernels"] == f"{weights}-weight-only{suffix}"
    layers = [m for m in quant.model.decoder.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == int(weights[3:]) for m in layers)
    assert {m.kernel for m in layers} == {"native" if kernels == "auto" else "torch"}
    ids = torch.randint(0, dense.vocab_size, (dense.num_codebooks, 40), generator=torch.Generator().manual_seed(3))
    want = decoder_logits(dense, ids)
    got = decoder_logits(quant, ids)
    error = float((got - want).norm() / want.norm())
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert error < bound and top1 > (0.9 if weights == "int8" else 0.6), (error, top1)
    with torch.no_grad():  # a wrong scale (x2) in every layer: the bound must catch it
        for m in layers:
            scales_of(m).mul_(2.0)
    broken = float((decoder_logits(quant, ids) - want).norm() / want.norm())
    assert broken > bound, broken


def test_quantized_weights_are_a_cpu_feature_and_auto_picks_int8_on_a_bf16_cpu() -> None:
    from radio.errors import ModelError
    from radio.musicgen.model import cpu_supports_bf16, resolve_weights

    with pytest.raises(ModelError, match="CPU feature"):
        resolve_weights("int4", "cuda", torch.bfloat16)
    assert resolve_weights("auto", "cpu", torch.float32) == "dense"  # an explicit float32 dtype is respected
    assert resolve_weights("auto", "cuda", torch.bfloat16) == "dense"
    if cpu_supports_bf16():
        assert resolve_weights("auto", "cpu", torch.bfloat16) == "int8"


@pytest.mark.parametrize("bits, bound, outputs", [(8, 0.02, 96), (4, 0.15, 128), (4, 0.15, 96)])
def test_a_quantized_layer_agrees_with_its_dense_one_for_few_rows_and_many(bits: int, bound: float,
                                                                           outputs: int) -> None:
    """Decode steps (the weight-only kernel) and a prefill (a dense copy of the weight made for the call, where
    the packing can be read back: int8 always, int4 in blocks of 64 outputs) both stay within the quantization's
    bound of the dense layer, and the prefill's rows are the kernel's rows to bf16's rounding."""
    from radio.musicgen.kernels import DEQUANTIZE_ROWS, QuantLinear

    gen = torch.Generator().manual_seed(1)
    dense = nn.Linear(256, outputs)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(outputs, 256, generator=gen) * 0.05)
    layer = QuantLinear(dense, bits)
    assert layer.unpackable == (bits == 8 or outputs % 64 == 0)
    for rows in (2, 7, 200):
        x = torch.randn(rows, 256, generator=gen)
        with torch.no_grad():
            want, got = dense(x), layer(x)
            by_kernel = torch.cat([layer(x[i:i + 2]) for i in range(0, rows, 2)])
        assert got.dtype == x.dtype and got.shape == want.shape
        assert float((got - want).norm() / want.norm()) < bound, rows
        assert rows <= DEQUANTIZE_ROWS[bits] or float((got - by_kernel).norm() / by_kernel.norm()) < 0.01, rows


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_an_8bit_kv_cache_stays_within_a_bound_of_the_full_one_and_halves_it(tiny_model_dir: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             kernels: str) -> None:
    """``kv: 8bit`` on the dynamic path, read by PyTorch's ops or radio's kernel (``auto``, where this CPU has
    it): teacher-forced over the full cache's own greedy codes, the logits stay within a bound of the full
    cache's and agree on the top code; the cache takes about half the memory; a wrong scale (x2) breaks the
    bound."""
    from radio.errors import ModelError
    from radio.musicgen import native

    if kernels == "auto" and not native.available():
        pytest.skip(f"radio's CPU kernels are off here: {native.why_not()}")
    import radio.musicgen.prefill as prefill_module
    import radio.musicgen.step as step_module
    from radio.musicgen.decoding import KV8_SCALE_BYTES, kv8_pack

    greedy = Sampling(temperature=0.0, top_k=250, guidance=3.0)
    full = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic", compile="never",
                         kv="full")
    kv8 = MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, decoder="dynamic", kv="8bit",
                        kernels=kernels)
    assert (full.describe()["kv"], kv8.describe()["kv"]) == ("full", "8bit")
    assert kv8.decode_path.parts.native == (kernels == "auto")  # radio's kernel reads the cache, or PyTorch
    context = np.random.default_rng(4).integers(0, full.vocab_size, (full.num_codebooks, 30))
    request = ContinuationRequest(context, "jazz piano at night", greedy, key="a")
    codes = full.continue_batch([request], 24)[0].codes[:, :24]
    kv8.continue_batch([request], 24)
    assert kv8.dynamic_state.k_bufs[0].dtype == torch.int8
    assert kv8.decode_state_bytes() < 0.7 * full.decode_state_bytes()

    def error_and_top1() -> tuple[float, float]:
        want = full.decode_path.teacher_forced_logits(request, codes)
        got = kv8.decode_path.teacher_forced_logits(request, codes)
        return (float((got - want).norm() / want.norm()),
                float((got.argmax(-1) == want.argmax(-1)).float().mean()))

    error, top1 = error_and_top1()
    assert error < 0.01 and top1 > 0.9, (error, top1)  # measured: 0.0014 and 1.0

    def wrong_scale(x: torch.Tensor) -> torch.Tensor:
        packed = kv8_pack(x)
        packed[..., -KV8_SCALE_BYTES:].view(torch.float32).mul_(2.0)
        return packed

    for module in (prefill_module, step_module):  # where prefills and steps write the cache
        monkeypatch.setattr(module, "kv8_pack", wrong_scale)
    broken, _ = error_and_top1()
    assert broken > 0.01, broken  # measured: 0.027
    with pytest.raises(ModelError, match="unknown kv"):
        MusicgenModel(str(tiny_model_dir), weights="bfloat16", seed=0, kv="4bit")
