"""radio's own CPU kernels (radio/musicgen/native): built here, held to the float math they stand for, chosen by a
model where they work and left where they do not."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radio.config import Sampling
from radio.musicgen import native
from radio.musicgen.decoding import kv8_pack
from radio.musicgen.model import ContinuationRequest, MusicgenModel, resolve_kv
from radio.musicgen.native.layers import LayerStack
from radio.musicgen.step import _attend8

needs_native = pytest.mark.skipif(not native.available(), reason=f"radio's CPU kernels are off: {native.why_not()}")


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 96), (64, 256), (1024, 4096)])
def test_the_integer_product_is_the_quantized_weights_product_to_the_rows_rounding(
        bits: int, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """Rows of activations (1 to 11: one pass of 8 rows and a rest; 150: a prefill's, in tiles of rows, 64 a
    tile at 4,096 inputs) times a packed weight equal the float product with the weight the codes stand for, to
    the per-row int8 rounding of the activations (~1 %), and a packing that swaps two inputs' codes, or ignores
    the scales, is far off."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    group = 64 if in_features % 64 == 0 else 32
    packed, dense = native.pack8(weight) if bits == 8 else native.pack4(weight, group)
    for rows in (1, 2, 11, 150):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        want = x.float() @ dense.t()
        got = native.linear(x, packed, out_features, bits, group)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        assert float((got.float() - want).norm() / want.norm()) < 0.02, rows
        worst = ((got.float() - want).norm(dim=1) / want.norm(dim=1)).max()  # every row, the tiles' last among them
        assert float(worst) < 0.05, rows
    x = torch.randn(2, in_features, generator=gen)
    want = x @ dense.t()
    w, scales, extra = packed
    if bits == 8:  # the inputs' order within a group of four, swapped
        swapped = w.clone()
        swapped[..., [0, 1]] = w[..., [1, 0]]
        broken = native.linear(x, (swapped, scales, extra), out_features, bits, group)
    else:  # the low and high nibbles (inputs i and i + 4) swapped
        swapped = w.clone()
        swapped[:, :, 64:] = (w[:, :, 64:] >> 4) | (w[:, :, 64:] << 4)
        broken = native.linear(x, (swapped, scales, extra), out_features, bits, group)
    assert float((broken - want).norm() / want.norm()) > 0.3


@needs_native
def test_packed_weights_read_back_as_the_weights_they_stand_for() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    for bits in (8, 4):
        packed, dense = native.pack8(weight) if bits == 8 else native.pack4(weight, 32)
        back = native.unpack(*packed, 64, bits).float()
        torch.testing.assert_close(back, dense, rtol=1e-2, atol=1e-3)


@needs_native
@pytest.mark.parametrize("head", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_8bit_attention_equals_pytorchs_over_the_same_cache(head: int, dtype: torch.dtype) -> None:
    """One query per row over an 8-bit cache: radio's kernel and PyTorch's ops (step._attend8) give the same
    output over left-padded and right-masked rows, and a mask it ignored would change it."""
    gen = torch.Generator().manual_seed(2)
    rows, heads, columns = 4, 3, 37
    q = torch.randn(rows, heads, 1, head, generator=gen).to(dtype)
    k = kv8_pack(torch.randn(rows, heads, columns, head, generator=gen))
    v = kv8_pack(torch.randn(rows, heads, columns, head, generator=gen))
    live = torch.ones(rows, columns, dtype=torch.bool)
    live[0, 30:] = False  # columns past the row's length
    live[1, :9] = False  # left padding
    live[3, :] = False
    live[3, 5] = True  # a single live column
    bias = torch.where(live, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
    want = _attend8(q, k, v, bias, 0.125, None).float()[:, :, 0]
    got = native.attend8(q[:, :, 0], k, v, bias.reshape(rows, columns), 0.125).float()
    assert got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    unmasked = native.attend8(q[:, :, 0], k, v, torch.zeros(rows, columns), 0.125).float()
    assert float((unmasked - want).abs().max()) > 0.05


def test_kernels_off_by_setting_or_environment(tiny_model_dir: Path) -> None:
    """``kernels: torch`` keeps PyTorch's kernels and a full cache for ``kv: auto``; ``auto`` takes radio's where
    they work (then the 8-bit cache too); ``RADIO_NATIVE_KERNELS=0`` turns them off with a reason; a bad value is
    refused."""
    from radio.errors import ModelError

    torch_model = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never", kernels="torch")
    assert not torch_model.native and torch_model.kv == "full"
    assert "radio's" not in str(torch_model.describe()["kernels"])
    auto = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
    assert auto.native == native.available()
    assert auto.kv == ("8bit" if native.available() else "full")
    assert resolve_kv("auto", True) == "8bit" and resolve_kv("auto", False) == "full"
    assert resolve_kv("full", True) == "full"
    with pytest.raises(ModelError, match="unknown kernels"):
        MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, kernels="fast")
    code = ("import os; os.environ['RADIO_NATIVE_KERNELS'] = '0'; from radio.musicgen import native; "
            "print(native.available(), native.why_not())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False RADIO_NATIVE_KERNELS=0"


@needs_native
def test_a_model_on_radios_kernels_continues_like_one_on_pytorchs(tiny_model_dir: Path) -> None:
    """int8 weights and an 8-bit cache, compiled layer, on radio's kernels and on PyTorch's: greedy continuations
    of the same context agree on most codes (the activations' rounding moves a few), and the kernels' model
    generates sampled audio as any other."""
    greedy = Sampling(temperature=0.0, top_k=250, guidance=3.0)
    models = [MusicgenModel(str(tiny_model_dir), weights="int8", kv="8bit", seed=0, kernels=k)
              for k in ("torch", "auto")]
    assert [m.native for m in models] == [False, True]
    context = np.random.default_rng(5).integers(0, models[0].vocab_size, (models[0].num_codebooks, 40))
    request = ContinuationRequest(context, "slow strings", greedy, key="a")
    codes = [m.continue_batch([request], 30)[0].codes for m in models]
    assert codes[0].shape == codes[1].shape
    assert float((codes[0] == codes[1]).mean()) > 0.6
    sampled = models[1].continue_batch([ContinuationRequest(context, "slow strings", Sampling(), key="b")], 20)[0]
    assert sampled.pcm.size > 0 and np.isfinite(sampled.pcm).all()


def test_linear_layers_keep_pytorchs_kernel_where_the_shape_does_not_suit() -> None:
    from radio.musicgen.kernels import QuantLinear

    odd = QuantLinear(nn.Linear(64, 40), 8, "native")  # 40 outputs: not blocks of 16
    assert odd.kernel == "torch" and not native.fits(40, 64) and native.fits(48, 64)


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_q_k_and_v_joined_give_the_three_products_and_hold_the_weights_once(bits: int) -> None:
    from radio.musicgen.kernels import QuantLinear, join_projections

    gen = torch.Generator().manual_seed(3)
    attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        dense = nn.Linear(128, 64, bias=False)
        with torch.no_grad():
            dense.weight.copy_(torch.randn(64, 128, generator=gen) * 0.05)
        setattr(attn, name, QuantLinear(dense, bits, "native"))
    layer = nn.Module()
    layer.self_attn = attn
    x = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    apart = [getattr(attn, name)(x) for name in ("q_proj", "k_proj", "v_proj")]

    assert join_projections(layer) == 1
    joined = attn.qkv_proj(x)

    assert joined.shape == (3, 192)
    assert torch.equal(joined, torch.cat(apart, dim=1))  # the same integer products, one rounding of x
    assert all(torch.equal(getattr(attn, name)(x), want) for name, want in zip(("q_proj", "k_proj", "v_proj"), apart))
    base = attn.qkv_proj.weight.untyped_storage().data_ptr()
    assert all(getattr(attn, name).weight.untyped_storage().data_ptr() == base for name in ("q_proj", "k_proj"))
    torch_kernel = nn.Module()
    torch_kernel.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(torch_kernel.self_attn, name, QuantLinear(nn.Linear(128, 64, bias=False), bits, "torch"))
    assert join_projections(torch_kernel) == 0 and not hasattr(torch_kernel.self_attn, "qkv_proj")


@needs_native
def test_a_quantized_model_on_radios_kernels_steps_with_the_joined_projections(tiny_model_dir: Path) -> None:
    """The tiny model's decoder layers get one q/k/v product each; its eager steps continue a context exactly
    as the three products do, and its compiled steps (which call the joined one too) alike."""
    from unittest import mock

    from radio.musicgen import kernels

    greedy = Sampling(temperature=0.0, top_k=250, guidance=3.0)
    with mock.patch.object(LayerStack, "of", return_value=None):  # the layers one by one, not radio's loop
        with mock.patch.object(kernels, "join_projections", return_value=0):
            apart = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
        eager = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
    models = [eager, MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="always")]
    assert all(hasattr(layer.self_attn, "qkv_proj") for layer in models[0].model.decoder.model.decoder.layers)
    assert not hasattr(apart.model.decoder.model.decoder.layers[0].self_attn, "qkv_proj")
    assert models[1].compile and not models[1].layer_loop and not eager.layer_loop
    context = np.random.default_rng(2).integers(0, apart.vocab_size, (apart.num_codebooks, 30))
    request = ContinuationRequest(context, "slow strings", greedy, key="a")
    want = apart.continue_batch([request], 20)[0].codes
    eager, compiled = (m.continue_batch([request], 20)[0].codes for m in models)
    assert np.array_equal(eager, want)
    assert float((compiled == want).mean()) > 0.8


@needs_native
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_layer_loop_computes_the_eager_layers_and_their_cache_writes(tiny_model_dir: Path, weights: str) -> None:
    """radio's layer loop (every decoder layer of a step in one call) against the model's eager layers, each
    layer on the same random rows, caches and prompts, one station and two: its output and key/value write agree
    to the activations' rounding; a wrong layer norm or a wrong unconditional constant in the loop breaks it; and
    the whole loop in one call gives the layers one after another."""
    model = MusicgenModel(str(tiny_model_dir), weights=weights, seed=0, compile="never")
    parts = model.decode_path.parts
    stack = parts.stack
    assert model.layer_loop and isinstance(stack, LayerStack) and not model.compile
    assert "radio's layer loop" in str(model.describe()["kernels"])
    errors = [stack._probe(parts, stations) for stations in (1, 2)]
    assert max(errors) < 0.03, errors
    assert stack.nbytes() == sum(t.numel() * 4 for t in (*stack.norms, stack.uncond))

    norms = [t.clone() for t in stack.norms]
    norms[6] = norms[6] * 1.5  # the second layer's self-attention norm
    assert LayerStack(**{**vars(stack), "norms": norms})._probe(parts, 1) > 0.1
    assert not LayerStack(**{**vars(stack), "norms": norms}).works(parts)
    skewed = stack.uncond + torch.linspace(-1, 1, stack.uncond.shape[1])  # (a constant would leave the norms as are)
    assert LayerStack(**{**vars(stack), "uncond": skewed})._probe(parts, 2) > 0.1

    gen = torch.Generator().manual_seed(9)
    H, d, rows, W, S = parts.num_heads, parts.head_dim, 4, 20, 5
    with torch.inference_mode():
        h = torch.randn(rows, H * d, generator=gen)  # float32: the loop's own rows between its layers
        kv = [(kv8_pack(torch.randn(rows, H, W, d, generator=gen)), kv8_pack(torch.randn(rows, H, W, d, generator=gen)))
              for _ in parts.layers]
        xk = [torch.randn(2, H, S, d, generator=gen).to(torch.bfloat16) for _ in parts.layers]
        xv = [torch.randn(2, H, S, d, generator=gen).to(torch.bfloat16) for _ in parts.layers]
        columns, bias, cross = torch.full((rows,), 7), torch.zeros(rows, W), torch.zeros(2, S)
        bias[:, 8:] = torch.finfo(torch.float32).min
        one_by_one = [(k.clone(), v.clone()) for k, v in kv]
        y = h
        for i in range(len(parts.layers)):
            y = stack.layer(i)(y, one_by_one[i:i + 1], xk[i:i + 1], xv[i:i + 1], columns, bias, cross, True)
        whole = stack(h, kv, xk, xv, columns, bias, cross, True)
    assert torch.equal(whole, y)
    assert all(torch.equal(a, b) for pair, other in zip(kv, one_by_one) for a, b in zip(pair, other))


@needs_native
def test_a_model_with_the_layer_loop_continues_as_its_layers_do_and_falls_back_when_it_fails(
        tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """int8 weights and an 8-bit cache: the model with radio's layer loop continues a context greedily like the
    same model stepping its layers one by one (the loop keeps the activations in float32 between the products,
    so a few codes move); a loop that fails mid-chunk leaves the model on its layers for good, the chunk whole."""
    from unittest import mock

    from radio.musicgen.native import layers as layers_module

    greedy = Sampling(temperature=0.0, top_k=250, guidance=3.0)
    with mock.patch.object(LayerStack, "of", return_value=None):
        apart = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
    loop = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
    assert loop.layer_loop and not apart.layer_loop
    rng = np.random.default_rng(4)
    requests = [ContinuationRequest(rng.integers(0, loop.vocab_size, (loop.num_codebooks, 30 + 9 * i)), prompt,
                                    greedy, key=f"s{i}") for i, prompt in enumerate(["slow strings", "fast drums"])]
    want = [r.codes for r in apart.continue_batch(requests, 24)]
    got = [r.codes for r in loop.continue_batch(requests, 24)]
    assert [g.shape for g in got] == [w.shape for w in want]
    assert float(np.mean([(g == w).mean() for g, w in zip(got, want)])) > 0.8

    calls = {"n": 0}
    real = layers_module.decode_layers

    def fails_later(*args: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("radio_cpu::decode_layers: out of memory")
        return real(*args)  # type: ignore[arg-type]

    model = MusicgenModel(str(tiny_model_dir), weights="int8", seed=0, compile="never")
    with caplog.at_level(logging.WARNING, logger="radio.musicgen.step"):
        with mock.patch.object(layers_module, "decode_layers", fails_later):
            out = model.continue_batch(requests[:1], 20)[0]
    assert calls["n"] == 4 and not model.layer_loop
    assert "radio's layer loop failed" in caplog.text and "out of memory" in caplog.text
    assert out.codes.shape[1] == 20 and out.pcm.size > 0 and np.isfinite(out.pcm).all()
    assert "radio's layer loop" not in str(model.describe()["kernels"])
