"""QuantLinear's forward paths against a dequantization done here, bit by bit, from the packed GPTQ tensors."""

from __future__ import annotations

import pytest
import torch

from llmopt.quantize import packing, qlinear
from llmopt.quantize.gptq import QuantSpec, rtn_quantize
from llmopt.quantize.qlinear import QuantLinear


def _bit_stream(words: torch.Tensor) -> torch.Tensor:
    """int32 [W, C] -> bits [W * 32, C], LSB of word 0 first."""
    u = words.to(torch.int64) & 0xFFFFFFFF
    return ((u.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[1])


def _values(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = _bit_stream(words)[: count * bits].view(count, bits, -1)
    return (stream * (1 << torch.arange(bits)).view(1, bits, 1)).sum(1)          # [count, C]


def _reference_weight(t: dict[str, torch.Tensor], bits: int, k: int, n: int) -> torch.Tensor:
    """W [N, K] from gptq_v2 tensors: (q - zero) * scale per input column's group."""
    q = _values(t["qweight"], bits, k).t()                                     # [N, K]
    zeros = _values(t["qzeros"].t().contiguous(), bits, n).t()                 # [G, N]
    g = t["g_idx"].long()
    return (q - zeros[g].t()).double() * t["scales"].double()[g].t()


def _layer(n, k, bits, group, sym, seed=0, shuffle=False, use_kernels=True, device="cpu"):
    torch.manual_seed(seed)
    r = rtn_quantize(torch.randn(n, k), QuantSpec(bits, group, sym))
    q, g_idx = r.q, r.g_idx
    if shuffle:                      # act-order without static groups, as other tools write it
        perm = torch.randperm(k)
        q, g_idx = q[:, perm], g_idx[perm]
    t = packing.pack_layer(q, r.scales, r.zeros, g_idx, bits, "gptq_v2")
    bias = torch.randn(n)
    q2, zeros, scales, g2 = packing.unpack_layer(t, bits, "gptq_v2", k, n, group)
    m = QuantLinear(q2, zeros, scales, g2, bias, bits, group, device=device, use_kernels=use_kernels)
    return m, _reference_weight(t, bits, k, n), bias


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b) / torch.linalg.norm(b)).item()


@pytest.mark.parametrize("n,k,bits,group,sym,mode", [
    (96, 576, 4, 128, True, "int4"),      # K = 4.5 groups: padded input, partial last group
    (200, 256, 4, 64, False, "int4"),     # asymmetric (zero offsets), N not a multiple of 64
    (64, 320, 4, -1, True, "int4"),       # per channel
    (64, 192, 8, -1, True, "int8"),
    (64, 192, 8, -1, False, "int8"),      # zero-point correction
    (64, 192, 3, 64, True, "dequant"),
    (64, 224, 3, 32, False, "dequant"),   # K = 7 words of 32 codes: padded to 256 for the kernel-free path
    (48, 256, 2, 128, False, "dequant"),
    (48, 256, 8, 64, True, "dequant"),    # 8 bits with groups: no kernel
])
def test_kernel_and_dequant_paths_match_reference_from_packed_tensors(n, k, bits, group, sym, mode):
    m, w_ref, bias = _layer(n, k, bits, group, sym)
    assert m.mode == mode
    x = torch.randn(3, 70, k)
    reference = x.double() @ w_ref.t() + bias.double()
    dequant = m.forward_dequant(x)
    assert dequant.shape == reference.shape and dequant.dtype == x.dtype
    assert _rel(dequant, reference) < 1e-2                  # bf16 activations / scales at most
    assert _rel(m.forward_kernel(x), reference) < 1e-2
    assert _rel(m.dequantized_weight(), w_ref) < 1e-2


@pytest.mark.parametrize("bits,group,shuffle", [(2, 64, False), (3, 32, True), (3, -1, False), (8, 64, True)])
def test_kernel_free_path_is_exact_in_the_float32_input_dtype(bits, group, shuffle):
    m, w_ref, bias = _layer(96, 256, bits, group, False, seed=3, shuffle=shuffle, use_kernels=False)
    assert m.mode == "dequant"
    assert torch.allclose(m.dequantized_weight().double(), w_ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(5, 256)
    assert _rel(m.forward_dequant(x), x.double() @ w_ref.t() + bias.double()) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vectorized_unpack_reads_the_gptq_bit_stream(bits):
    m, _, _ = _layer(64, 224, bits, 32, True, seed=5, use_kernels=False)
    stream_codes = _values(m.qweight, bits, 224)
    assert torch.equal(m._unpacked_codes_t()[:224].long(), stream_codes)


def test_int4_dequant_weight_equals_kernel_formula_exactly():
    m, _, _ = _layer(136, 384, 4, 128, False, seed=7)
    sz = m.scales_zeros.float()                              # the kernel's W = (q - 8) * scale + zero_f
    codes = m._int4_codes_t().float()[:384, :136].t()
    group = torch.arange(384) // 128
    expected = (codes - 8) * sz[group, :136, 0].t() + sz[group, :136, 1].t()
    assert m.cheap_dequant                                   # prefill reads this layout, no fallback
    assert torch.equal(m.dequantized_weight(torch.float32), expected)


def test_a_misread_int4_layout_turns_the_cheap_dequant_off(monkeypatch):
    block = qlinear._cpu_block()
    monkeypatch.setattr(qlinear, "_cpu_block", lambda: 16 if block != 16 else 32)   # not the kernel's layout
    m, _, _ = _layer(200, 256, 4, 64, False, seed=3)      # several blocks of rows: only some are probed
    assert not m.cheap_dequant
    monkeypatch.setattr(qlinear, "_cpu_block", lambda: block)
    assert _layer(200, 256, 4, 64, False, seed=3)[0].cheap_dequant        # the right layout passes the probe


@pytest.mark.parametrize("n,k,bits,group,sym,token_path", [
    (128, 256, 4, 64, True, True),
    (128, 256, 4, 64, False, True),        # zero offsets
    (96, 576, 4, 128, True, False),        # padded input: the general path
    (200, 256, 4, 64, True, False),        # N not a multiple of the kernel's blocks: sliced, general path
    (64, 192, 8, -1, True, True),
    (64, 192, 8, -1, False, False),        # zero-point correction: general path
])
def test_one_token_takes_the_short_path_with_the_kernel_path_result(n, k, bits, group, sym, token_path,
                                                                     monkeypatch):
    m, _, _ = _layer(n, k, bits, group, sym)
    assert m.token_path == token_path
    x = torch.randn(1, 1, k)
    want = m.forward_kernel(x)
    taken = []
    real = m.forward_token
    monkeypatch.setattr(m, "forward_token", lambda x: taken.append(1) or real(x))
    got = m(x)
    assert torch.equal(got, want) and got.shape == (1, 1, n)
    assert len(taken) == token_path
    m(torch.randn(1, 2, k))                # two tokens: the general path
    assert len(taken) == token_path


def test_forward_switches_to_dequant_from_dequant_min_rows(monkeypatch):
    m, _, _ = _layer(64, 128, 4, 64, True)
    calls = []
    monkeypatch.setattr(m, "forward_kernel", lambda x: calls.append("kernel") or x)
    monkeypatch.setattr(m, "forward_dequant", lambda x: calls.append("dequant") or x)
    rows = qlinear.DEQUANT_MIN_ROWS
    assert isinstance(rows, int) and rows > 1
    m(torch.randn(rows - 1, 128))
    m(torch.randn(1, rows, 128))
    assert calls == ["kernel", "dequant"]


def test_large_layer_is_dequantized_in_chunks_with_the_same_result(monkeypatch):
    m, w_ref, bias = _layer(320, 64, 4, 32, False, seed=9)
    x = torch.randn(7, 64)
    whole = m.forward_dequant(x)
    monkeypatch.setattr(qlinear, "_DEQUANT_CHUNK", 128)     # 320 rows -> chunks of 128, 128, 64
    assert torch.equal(m.forward_dequant(x), whole)
