"""Reading codes back from tinygemm's buffer (`llmopt.quantize.tinygemm`), and the CUDA int4 paths built on it.

On CPU the order is learned from a stand-in converter that shuffles each tile by a fixed random permutation;
the tests marked for CUDA check the real converter and QuantLinear on a GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch

from llmopt.quantize import qlinear, tinygemm
from llmopt.quantize.head import head_rows

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _shuffling_converter(seed: int = 0):
    """codes [N, K] -> int32 [N/8, K/128, 32, 4]: each 8 x 128 tile's codes in one fixed shuffled order."""
    where = torch.randperm(1024, generator=torch.Generator().manual_seed(seed))     # position -> nibble slot

    def convert(codes: torch.Tensor) -> torch.Tensor:
        n, k = codes.shape
        tiles = codes.view(n // 8, 8, k // 128, 128).transpose(1, 2).reshape(n // 8, k // 128, 1024)
        nib = torch.empty_like(tiles).index_copy_(-1, where, tiles).to(torch.uint8)
        packed = nib[..., ::2] | nib[..., 1::2] << 4                               # low nibble first
        return packed.contiguous().view(torch.int32).view(n // 8, k // 128, 32, 4)

    return convert


def test_learned_order_reads_back_every_code_of_a_shuffled_layout():
    convert = _shuffling_converter()
    order = tinygemm.learn_order(convert)
    assert order is not None
    codes = torch.randint(0, 16, (24, 384), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    buf = convert(codes)
    assert torch.equal(tinygemm.codes(buf, order, 24, 384), codes.to(torch.uint8))
    rows = torch.tensor([23, 0, 9, 9, 15])
    assert torch.equal(tinygemm.codes_of_rows(buf, order, rows, 24, 384), codes[rows].to(torch.uint8))


def test_a_layout_that_does_not_hold_each_code_once_is_refused():
    convert = _shuffling_converter()
    assert tinygemm.learn_order(lambda c: convert(c) & 0x0F0F0F0F) is None          # high nibbles lost
    assert tinygemm.learn_order(lambda c: convert(c)[..., :2]) is None               # half a tile




@cuda
def test_the_real_converter_has_a_learnable_tile_order():
    assert tinygemm.tile_order(torch.device("cuda")) is not None


@cuda
@pytest.mark.parametrize("n,k,group,sym", [(96, 576, 128, True), (200, 256, 64, False), (64, 512, 256, True)])
def test_cuda_int4_kernel_and_dequant_paths_match_the_reference(n, k, group, sym, monkeypatch):
    from tests.test_qlinear import _layer

    m, w_ref, bias = _layer(n, k, 4, group, sym, device="cuda")
    assert m.mode == "int4" and m.cheap_dequant
    x = torch.randn(3, 200, k, device="cuda", dtype=torch.bfloat16)
    reference = (x.double() @ w_ref.t().cuda() + bias.double().cuda())
    rel = lambda a: (torch.linalg.norm(a.double() - reference) / torch.linalg.norm(reference)).item()  # noqa: E731
    assert rel(m.forward_kernel(x)) < 1e-2 and rel(m.forward_dequant(x)) < 1e-2
    assert torch.allclose(m.dequantized_weight(torch.float32).double(), w_ref.cuda(), rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(qlinear, "CUDA_DEQUANT_MIN_ROWS", 64)
    monkeypatch.setattr(qlinear, "CUDA_DEQUANT_MIN_WEIGHTS", 0)
    monkeypatch.setattr(m, "forward_kernel", lambda x: pytest.fail("600 rows took the kernel"))
    assert rel(m(x)) < 1e-2
    rows = torch.tensor([0, n - 1, 5], device="cuda")
    got = head_rows(m, rows, torch.float32)
    assert torch.allclose(got, m.dequantized_weight(torch.float32)[rows], rtol=1e-3, atol=1e-3)
