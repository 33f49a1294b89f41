"""The whole path on a GPU: GPTQ on CUDA, the checkpoint served by tinygemm, generate, bench, and the compiled
(CUDA graph) decode step giving eager decoding's tokens. Skipped on machines without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from llmopt import compiled
from llmopt.attention import serve_attention
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize
from llmopt.quantize.qlinear import QuantLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gptq_on_cuda(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
                         intermediate_size=256)
    out = tmp_path / "gptq"
    quantize(QuantizeOptions(model=str(src), output=str(out), calib="builtin", nsamples=4, seq_len=64,
                             device="cuda", group_size=64))
    return src, out


def test_gptq_on_cuda_loads_on_tinygemm_and_generates(gptq_on_cuda, cli):
    _, out = gptq_on_cuda
    model = load_model(str(out), device="cuda").model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.mode == "int4" and m.cheap_dequant and m.w_int4.is_cuda for m in layers)
    code, stdout, _ = cli("generate", str(out), "The assert statement", "--max-new-tokens", "6", "--device", "cuda",
                          "--json")
    assert code == 0 and json.loads(stdout)["new_tokens"] > 0


def test_compiled_cuda_graph_decode_matches_eager(gptq_on_cuda):
    from tests.test_compiled import _eager_greedy

    _, out = gptq_on_cuda
    model = load_model(str(out), device="cuda").model
    serve_attention(model)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    want = _eager_greedy(model, ids, 8)
    torch._dynamo.reset()
    compiled.warm_up(model, ids, 8)
    assert compiled.greedy(model, ids, 8) == want
    assert model._llmopt_step_alone is False


def test_bench_on_cuda_reports_gpu_memory(gptq_on_cuda, cli):
    src, out = gptq_on_cuda
    code, stdout, err = cli("bench", str(out), "--baseline", str(src), "--device", "cuda", "--skip-quality",
                            "--prompt-len", "64", "--gen-len", "8", "--repeats", "1", "--json")
    assert code == 0, err
    rows = json.loads(stdout)["models"]
    assert all(r["metrics"]["peak_cuda_allocated_bytes"] > 0 for r in rows)
