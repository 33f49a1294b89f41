"""`llmopt bench --gguf-runtime`: a GGUF file timed and scored through llama.cpp beside the Hugging Face
model it was exported from, in one run. The tests that run llama.cpp skip when llama-cpp-python (the
optional `llamacpp` extra) is not installed; the option's checks run everywhere."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import byte_bpe

from llmopt.bench.llamacpp import LlamaCppLM, load_llamacpp
from llmopt.bench.report import render_table
from llmopt.export import ExportOptions, export

ARGS = ["--ppl-data", "builtin", "--seq-len", "96", "--ppl-windows", "3", "--prompt-len", "32", "--gen-len", "8",
        "--repeats", "2", "--warmup", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """conftest's byte-level BPE with SmolLM2's special tokens: `<|endoftext|>` first. transformers adds
    `<|endoftext|>` to a byte-level vocabulary it reads back from a GGUF file when the vocabulary lacks it,
    so only with it does the tokenizer of the export have the vocabulary of the original."""
    return byte_bpe("<|endoftext|>")


@pytest.fixture
def exported(tiny_model_dir, tmp_path):
    """A tiny random LLaMA and its f16 GGUF export."""
    src = tiny_model_dir("llama")
    out = tmp_path / "tiny-f16.gguf"
    export(ExportOptions(model=str(src), output=str(out), type="f16"))
    return src, out


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """llama-cpp-python as if not installed: find_spec says None and `import llama_cpp` fails."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def needs_llama_cpp():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the optional llamacpp extra) is not installed")


def _bench_json(cli, *args) -> dict:
    code, out, err = cli("bench", *map(str, args), *ARGS, "--json")
    assert code == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------- the option's bad input

def test_unknown_gguf_runtime_exits_2_and_writes_nothing(cli, tmp_path, exported):
    src, gguf = exported
    csv = tmp_path / "t.csv"
    code, out, err = cli("bench", src, gguf, *ARGS, "--gguf-runtime", "vllm", "--csv", csv)
    assert code == 2, err
    assert "--gguf-runtime 'vllm' is not one of auto, llama.cpp, transformers" in " ".join(err.split())
    assert out == "" and not csv.exists() and not list(tmp_path.glob(".t.csv*"))


def test_llama_cpp_requested_but_missing_exits_2_before_loading(cli, tmp_path, exported, no_llama_cpp,
                                                                monkeypatch):
    src, gguf = exported

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the option was checked")

    monkeypatch.setattr("llmopt.bench.run.load_model", refuse)
    monkeypatch.setattr("llmopt.bench.run.load_llamacpp", refuse)
    csv = tmp_path / "t.csv"
    code, _, err = cli("bench", src, gguf, *ARGS, "--gguf-runtime", "llama.cpp", "--csv", csv)
    assert code == 2, err
    text = " ".join(err.split())
    assert "--gguf-runtime llama.cpp needs the 'llama_cpp' package" in text
    assert "pip install 'llmopt[llamacpp]'" in text and len(err.strip().splitlines()) == 1
    assert not csv.exists()


def test_auto_without_llama_cpp_runs_the_gguf_through_transformers(cli, exported, no_llama_cpp):
    src, gguf = exported
    report = _bench_json(cli, src, gguf, "--no-memory")
    assert report["method"]["gguf_runtime"] == "transformers" and report["method"]["llama_cpp"] is None
    assert [m["runtime"] for m in report["models"]] == ["transformers", "transformers"]


def test_batch_is_refused_through_llama_cpp(cli, exported):
    needs_llama_cpp()
    src, gguf = exported
    code, _, err = cli("bench", src, gguf, *ARGS, "--gguf-runtime", "llama.cpp", "--batch", "2")
    assert code == 2 and "--batch is not measured through llama.cpp" in " ".join(err.split())


# ----------------------------------------------------------------------------- through llama.cpp

def test_llama_cpp_beside_hf_scores_the_same_and_is_timed(cli, exported):
    needs_llama_cpp()
    src, gguf = exported
    report = _bench_json(cli, src, gguf, "--gguf-runtime", "llama.cpp")
    hf, lc = report["models"]
    assert (hf["runtime"], lc["runtime"]) == ("transformers", "llama.cpp")
    assert report["method"]["llama_cpp"]["threads"] == torch.get_num_threads() == report["method"]["torch_threads"]
    assert lc["same_tokenizer_as_baseline"] is True
    m, base = lc["metrics"], hf["metrics"]
    # f16 weights against float32: the same windows give the same perplexity to f16 rounding
    assert m["ppl_tokens"] == base["ppl_tokens"]
    assert m["perplexity"] == pytest.approx(base["perplexity"], rel=2e-4)
    assert abs(m["kl_vs_baseline"]) < 1e-5 and m["top1_agreement_pct"] > 99     # may round to -1e-9
    for k in ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "runtime_rss_bytes"):
        assert m[k] is not None and m[k] > 0, k
    assert len(lc["timings"]["decode_tok_s"]["rounds"]) == 2
    # weights: the file's f16 tensors, half the float32 model's bytes, less than the file
    assert m["parameters"] == base["parameters"]
    assert m["weight_bytes"] == pytest.approx(base["weight_bytes"] / 2, rel=0.01) and m["weight_bytes"] < m["disk_bytes"]
    assert m["disk_bytes"] == gguf.stat().st_size
    rendered = render_table(report)
    caption = str(rendered.caption)
    assert "llama.cpp" in caption and "transformers for" in caption
    assert any("on llama.cpp" in str(c) for c in rendered.columns[0]._cells)


def test_decode_continues_llama_cpp_state_and_prefill_starts_over(exported):
    """Token by token through the cache gives the logits of one whole-window evaluation; a new prefill
    forgets the old sequence; a state that is not the current one is refused."""
    needs_llama_cpp()
    _, gguf = exported
    model = load_llamacpp(gguf, 64, tokenizer=False, threads=1).model
    assert isinstance(model, LlamaCppLM)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits[0]
    assert full.shape == (24, model.n_vocab)
    other = model(input_ids=torch.randint(3, 500, (1, 16)), use_cache=True, past_key_values=None, logits_to_keep=1)
    out = model(input_ids=ids[:, :16], use_cache=True, past_key_values=None, logits_to_keep=1)
    assert out.logits.shape == (1, 1, model.n_vocab)
    torch.testing.assert_close(out.logits[0, 0], full[15], atol=2e-3, rtol=0)
    for t in range(16, 24):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, past_key_values=out.past_key_values)
        torch.testing.assert_close(out.logits[0, -1], full[t], atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="not the one its KV cache holds"):
        model(input_ids=ids[:, :1], use_cache=True, past_key_values=other.past_key_values)


def test_a_recipe_bench_step_takes_the_option_and_refuses_a_bad_value(cli, tmp_path, tiny_model_dir):
    """Recipes build BenchOptions from the same field: a good value plans, a bad one stops the dry run."""
    src = tiny_model_dir("llama")
    for value, code_wanted in (("transformers", 0), ("vllm", 2)):
        r = tmp_path / f"{value}.yaml"
        r.write_text(f"model: {src}\nout: {tmp_path}/out-{value}\nsteps:\n"
                     f"  - bench: {{ppl_data: builtin, gguf_runtime: {value}}}\n")
        code, _, err = cli("run", r, "--dry-run")
        assert code == code_wanted, err
        if code_wanted:
            assert "--gguf-runtime 'vllm' is not one of" in " ".join(err.split())
    assert not (tmp_path / "out-vllm").exists()


# ----------------------------------------------------------------------------- timing in a process of its own

def test_a_model_with_a_timer_apart_is_timed_by_it():
    from llmopt.bench.speed import time_generation

    class Apart:
        def time_apart(self, prompt, gen_len):
            assert prompt.shape == (1, 32) and gen_len == 8
            return 0.5, 1.4

    t = time_generation(Apart(), torch.zeros(1, 32, dtype=torch.long), 8)
    assert (t.ttft_s, t.decode_s, t.prompt_tokens, t.new_tokens, t.batch) == (0.5, 1.4, 32, 8, 1)
    assert t.decode_tok_s == pytest.approx(7 / 1.4)


def test_timer_apart_reports_a_file_it_cannot_open(tmp_path):
    """Runs with or without llama-cpp-python: the child's failure (no llama_cpp, or not a GGUF file) comes
    back as one error naming it."""
    from llmopt.bench.llamacpp_timer import ApartTimer

    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(RuntimeError, match="llama.cpp's timing process: .*(llama_cpp|could not load)"):
        ApartTimer(bogus, 64, 1)


def test_llama_cpp_is_timed_apart_without_torchs_wait_policy(exported, monkeypatch):
    """The child waits as llama.cpp alone would (no OMP_WAIT_POLICY), times real generations, and ends
    when closed."""
    needs_llama_cpp()
    from llmopt.bench.llamacpp_timer import ApartTimer

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    _, gguf = exported
    timer = ApartTimer(gguf, 64, 1)
    try:
        environ = open(f"/proc/{timer._proc.pid}/environ", "rb").read().split(b"\0")
        assert not any(v.startswith(b"OMP_WAIT_POLICY=") for v in environ)
        assert any(v.startswith(b"PATH=") for v in environ)          # the rest of the environment is kept
        ttft_s, decode_s = timer(torch.randint(3, 500, (1, 24)), 6)
        assert ttft_s > 0 and decode_s > 0
        with pytest.raises(ValueError, match="one sequence at a time"):
            timer(torch.randint(3, 500, (2, 24)), 6)
    finally:
        timer.close()
    assert timer._proc.returncode == 0
