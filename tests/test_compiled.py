"""The compiled decode step (`llmopt.compiled`, `bench --compile`): same tokens as eager decoding, one
graph with no breaks, one thread for the step and every thread back for its large calls."""

from __future__ import annotations

import pytest
import torch

from llmopt import compiled, kv_cache, one_thread
from llmopt.bench.run import BenchOptions, bench
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize


def test_single_threaded_gives_large_calls_the_outer_threads_back(two_threads):
    seen = []
    record = lambda: seen.append(torch.get_num_threads())       # noqa: E731
    with one_thread.single_threaded():
        record()
        one_thread.on_all_threads(record)
        one_thread.on_one_thread(record)
        with one_thread.single_threaded():                      # nested: still the outermost count
            one_thread.on_all_threads(record)
    one_thread.on_all_threads(record)                            # outside: as it is
    assert seen == [1, 2, 1, 2, 2] and torch.get_num_threads() == 2


@pytest.mark.parametrize("slow_on", [1, 2])
def test_small_calls_take_the_thread_count_measured_faster_once_per_kind(slow_on, two_threads, monkeypatch):
    import time

    monkeypatch.setattr(one_thread, "_faster_alone", {})
    calls = []

    def fn(x):
        calls.append(torch.get_num_threads())
        if torch.get_num_threads() == slow_on:
            time.sleep(0.003)
        return x + 1

    assert one_thread.faster_alone("k") is None
    assert one_thread.call_small("k", fn, 1) == 2
    assert sorted(set(calls)) == [1, 2] and len(calls) > 2          # measured on both counts, then ran
    assert one_thread.faster_alone("k") is (slow_on == 2)
    calls.clear()
    one_thread.call_small("k", fn, 1)
    assert calls == [3 - slow_on]                                    # measured once: the faster count only
    assert torch.get_num_threads() == 2


def test_all_threads_ops_compute_what_the_kernels_compute():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    w = torch.randint(-128, 127, (16, 64), dtype=torch.int8, generator=gen)
    scales = torch.rand(16, generator=gen).to(torch.bfloat16)
    assert torch.equal(one_thread.int8_mm(x, w, scales), torch.ops.aten._weight_int8pack_mm(x, w, scales))
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for n in (3, 5, 5))
    mask = torch.tensor([True, True, True, False, True]).view(1, 1, 1, 5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert torch.equal(one_thread.sdpa(q, k, v, mask, 0.3), want)


def _eager_greedy(model, ids, steps: int) -> list[int]:
    key = kv_cache.cache_keyword(model)
    tokens = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **{key: kv_cache.growing_cache(model)})
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            out = model(input_ids=token, use_cache=True, **{key: out[key if key in out else "past_key_values"]})
    return tokens


def test_compiled_decode_of_a_gptq_model_matches_eager_in_one_graph(tiny_model_dir, tmp_path, two_threads):
    """GQA (folded attention), fused q/k/v and gate/up, an int8 head: the compiled step's paths."""
    src = tiny_model_dir("llama", num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "gptq"
    quantize(QuantizeOptions(model=str(src), output=str(out), calib="builtin", nsamples=4, seq_len=32,
                             device="cpu", group_size=32))
    model = load_model(str(out), device="cpu", head="int8").model
    from llmopt.attention import serve_attention

    serve_attention(model)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(1))
    want = _eager_greedy(model, ids, 8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = compiled.greedy(model, ids, 8)
    assert got == want
    assert not torch._dynamo.utils.counters["graph_break"]       # the whole step is one graph
    assert compiled.greedy(model, ids, 8) == want                 # reused: no recompile needed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


def test_one_thread_pays_in_its_measurement_for_the_all_thread_call_after_it(two_threads, monkeypatch):
    """Going back to all threads costs the next parallel call (OpenMP resizes its team): a kind that is only
    faster alone when that cost is left out must run on all threads."""
    import time

    monkeypatch.setattr(one_thread, "_faster_alone", {})
    last = []

    def fn(x):
        threads = torch.get_num_threads()
        if threads == 2 and last and last[-1] == 1:
            time.sleep(0.003)                    # the team's resize, paid by the next call on all threads
        elif threads == 2:
            time.sleep(0.001)                    # alone, one thread is faster
        last.append(threads)
        return x

    one_thread.call_small("k", fn, 1)
    assert one_thread.faster_alone("k") is False


@pytest.mark.parametrize("alone", [True, False])
def test_warm_up_runs_the_step_on_the_thread_count_small_calls_measured_faster(alone, tiny_model_dir, two_threads,
                                                                             monkeypatch):
    monkeypatch.setattr(one_thread, "_faster_alone", {})
    monkeypatch.setattr(one_thread, "_measure", lambda fn, args: alone)
    src = tiny_model_dir("llama", num_attention_heads=4, num_key_value_heads=2)
    model = load_model(str(src), device="cpu").model
    from llmopt.attention import serve_attention

    serve_attention(model)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    want = _eager_greedy(model, ids, 6)
    torch._dynamo.reset()
    compiled.warm_up(model, ids, 6)
    assert one_thread._faster_alone                                  # the eager step measured its small calls
    assert model._llmopt_step_alone is alone
    seen, real = [], compiled.compiled_step
    monkeypatch.setattr(compiled, "compiled_step",
                        lambda m: (lambda **kw: seen.append(torch.get_num_threads()) or real(m)(**kw)))
    assert compiled.greedy(model, ids, 6) == want
    assert set(seen) == {1 if alone else 2} and torch.get_num_threads() == 2


def test_bench_compile_reports_compile_time_and_times_the_compiled_step(tiny_model_dir, monkeypatch):
    steps = []
    real = compiled.step
    monkeypatch.setattr(compiled, "step", lambda *a: steps.append(1) or real(*a))
    src = str(tiny_model_dir("llama"))
    report = bench(BenchOptions(models=[src], ppl_data="builtin", skip_quality=True, memory=False, prompt_len=16,
                                gen_len=4, repeats=1, warmup=0, device="cpu", compile=True))
    metrics = report["models"][0]["metrics"]
    assert metrics["compile_s"] > 0 and metrics["decode_tok_s"] > 0
    assert "compile" in report["method"]["speed"] and report["method"]["settings"]["compile"] is True
    assert len(steps) == 2 + 3             # the untimed compiling run's two steps, then gen_len - 1 timed ones


@torch.no_grad()
def test_compiled_steps_of_a_sliding_window_model_match_eager_logits_in_one_graph(tiny_tokenizer):
    """Gemma3: a 40-token prompt over a 32-token window, so the sliding mask decides the logits."""
    from conftest import build_tiny

    model = build_tiny("gemma3", tiny_tokenizer, num_hidden_layers=6)
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(2))
    key = kv_cache.cache_keyword(model)
    eager = model(input_ids=ids, use_cache=True, **{key: kv_cache.growing_cache(model)})
    cache = compiled.static_cache(model, 40 + 8)
    compiled.prefill(model, ids, cache)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(3)
    for i in range(8):
        token = torch.randint(3, 500, (1, 1), generator=gen)
        eager = model(input_ids=token, use_cache=True, **{key: eager[key] if key in eager else eager["past_key_values"]})
        got = compiled.compiled_step(model)(input_ids=token, use_cache=True, **{key: cache},
                                            cache_position=torch.tensor([40 + i]))
        assert torch.allclose(got.logits, eager.logits, rtol=0, atol=1e-5 * float(eager.logits.abs().max())), i
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
