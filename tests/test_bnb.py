"""bitsandbytes LLM.int8 / NF4 / FP4: round trip through transformers' own loader, bad input, missing extra."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from llmopt.errors import UserError

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install 'llmopt[bnb]')")

METHODS = {"llm-int8": [], "nf4": ["--double-quant"], "fp4": ["--compute-dtype", "float32"]}
PROMPT_IDS = [[5, 17, 99, 250, 3, 42, 7, 300, 128, 64, 11, 400]]


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny qwen2 (untied head, biased q/k/v) whose widths bitsandbytes' CPU 4-bit kernel accepts."""
    out = tmp_path_factory.mktemp("bnb") / "src"
    build_tiny("qwen2", tiny_tokenizer).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def quantized(tiny_src):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    """Each method run once through the public function; the logits of the in-memory quantized model
    (on a copy, so saving sees the model exactly as quantized) are captured just before it is saved."""
    import llmopt.quantize.bnb as bnb
    from llmopt.quantize import QuantizeOptions, quantize

    outputs: dict[str, tuple[Path, dict, torch.Tensor]] = {}
    real_save = bnb.save_pretrained
    for method, extra in METHODS.items():
        seen: dict = {}

        def capture(model, tokenizer, out, force, record):
            with torch.no_grad():
                seen["logits"] = copy.deepcopy(model)(torch.tensor(PROMPT_IDS)).logits.float()
            return real_save(model, tokenizer, out, force, record)

        bnb.save_pretrained = capture
        try:
            opts = QuantizeOptions(model=str(tiny_src), output=str(tiny_src.parent / method), method=method,
                                   double_quant="--double-quant" in extra,
                                   compute_dtype="float32" if method == "fp4" else "bfloat16")
            summary = quantize(opts)
        finally:
            bnb.save_pretrained = real_save
        outputs[method] = (Path(summary["output"]), summary, seen["logits"])
    return outputs


def test_round_trip_in_a_fresh_process_without_llmopt(quantized):
    """transformers alone (no llmopt import) loads each output and computes the same logits."""
    dirs = {m: str(p) for m, (p, _, _) in quantized.items()}
    dump = Path(next(iter(dirs.values()))).parent / "reloaded.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        out = {{}}
        for method, path in {dirs!r}.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={{"": "cpu"}})
            with torch.no_grad():
                out[method] = model(torch.tensor({PROMPT_IDS!r})).logits.float()
        assert "llmopt" not in sys.modules
        torch.save(out, {str(dump)!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = torch.load(dump)
    for method, (_, _, before) in quantized.items():
        assert torch.allclose(reloaded[method], before, atol=1e-5, rtol=0), method


def test_outputs_are_really_quantized_and_recorded(quantized, tiny_src):
    import bitsandbytes as bnb

    from llmopt.info import model_info
    from llmopt.models import load_model

    for method, (out, summary, _) in quantized.items():
        loaded = load_model(str(out), device="cpu")
        assert type(model_info(loaded.model)["quantization"]["quant_method"]) is str   # not transformers' Enum
        q = loaded.model.model.layers[0].self_attn.q_proj
        expected = bnb.nn.Linear8bitLt if method == "llm-int8" else bnb.nn.Linear4bit
        assert isinstance(q, expected), (method, type(q))
        assert type(loaded.model.lm_head) is torch.nn.Linear          # the head is kept in full precision
        record = json.loads((out / "llmopt.json").read_text())
        assert record["quantization"]["method"] == method and record["command"] == "quantize"
        assert record["metrics"]["quantized_layers"] == summary["quantized_layers"] == 3 * 7
        # measured rounding error: ~1% for row-wise int8, ~10% for 4-bit blocks
        err = record["metrics"]["weight_rel_error_mean"]
        assert (0 < err < 0.02) if method == "llm-int8" else (0.03 < err < 0.2), (method, err)
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "bitsandbytes" and "lm_head" in config["llm_int8_skip_modules"]
    nf4 = json.loads((quantized["nf4"][0] / "config.json").read_text())["quantization_config"]
    assert nf4["bnb_4bit_quant_type"] == "nf4" and nf4["bnb_4bit_use_double_quant"] is True


def test_info_and_generate_load_outputs(quantized, tiny_src, cli):
    code, out, err = cli("info", tiny_src, "--json")
    assert code == 0, err
    source = json.loads(out)
    sizes = {}
    for method, (path, _, _) in quantized.items():
        code, out, err = cli("info", path, "--json")
        assert code == 0, err
        facts = json.loads(out)
        assert facts["parameters"] == source["parameters"], method        # 4-bit packing hides nothing
        assert facts["quantization"]["quant_method"] == "bitsandbytes"
        sizes[method] = facts["weight_bytes"]
        code, out, err = cli("generate", path, "The assert statement", "--max-new-tokens", "4", "--json")
        assert code == 0, err
        assert json.loads(out)["new_tokens"] >= 1
    assert sizes["nf4"] < sizes["llm-int8"] < source["weight_bytes"]


# ----------------------------------------------------------------------------- bad input (exit 2)

@pytest.mark.parametrize("args, match", [
    (["--method", "nf4", "--bits", "4"], "--bits does not apply"),
    (["--method", "llm-int8", "--bits", "8"], "--bits does not apply"),
    (["--method", "llm-int8", "--threshold", "0"], "--threshold must be a positive"),
    (["--method", "llm-int8", "--threshold", "-1"], "--threshold must be a positive"),
    (["--method", "llm-int8", "--threshold", "nan"], "--threshold must be a positive"),
    (["--method", "nf4", "--threshold", "4"], "only applies to --method llm-int8"),
    (["--method", "llm-int8", "--double-quant"], "only applies to --method nf4/fp4"),
    (["--method", "llm-int8", "--compute-dtype", "float16"], "only applies to --method nf4/fp4"),
    (["--method", "nf4", "--group-size", "64"], "--group-size only applies to gptq"),
    (["--method", "fp4", "--calib", "builtin", "--nsamples", "8"], "--calib, --nsamples only apply to gptq"),
    (["--method", "nf4", "--compute-dtype", "int8"], "invalid --compute-dtype"),
    (["--method", "nf4", "--skip", "("], "is not a module name pattern"),
    pytest.param(["--method", "nf4", "--skip", "no_such_layer"], "matches no linear layer", marks=needs_bnb),
    pytest.param(["--method", "nf4", "--skip", "proj"], "matches no linear layer", marks=needs_bnb),
    pytest.param(["--method", "nf4", "--skip", "*proj"], "no linear layer is left", marks=needs_bnb),
])
def test_bad_options_exit_2_and_write_nothing(args, match, tiny_src, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = cli("quantize", tiny_src, "-o", out, *args)
    assert code == 2, err
    assert match.lower() in err.lower(), err
    assert list(tmp_path.iterdir()) == []                       # no output, no temporary sibling


@pytest.mark.parametrize("kw, match", [
    (dict(method="nf4", group_size=64), "--group-size only applies to gptq"),
    (dict(method="nf4", bits=4), "--bits does not apply"),
    (dict(method="llm-int8", threshold=0.0), "--threshold must be a positive"),
    (dict(method="fp4", compute_dtype="int8"), "invalid --compute-dtype"),
    (dict(method="llm-int8", skip=["model.layers.(1|2)"]), "is not a module name pattern"),
])
def test_options_validate_alone_refuses_bad_bitsandbytes_options(kw, match):
    """What a recipe's --dry-run runs: no model, no bitsandbytes, no file."""
    from llmopt.quantize import QuantizeOptions

    with pytest.raises(UserError) as e:
        QuantizeOptions(model="not-read", output="not-written", **kw).validate()
    assert match.lower() in str(e.value).lower()


SEVEN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")


@needs_bnb
def test_skip_means_dotted_names_with_wildcards_as_for_gptq(tiny_model_dir, tmp_path):
    """model.layers.1 is layer 1 only (not 10); *.down_proj is a wildcard, not a regular expression; and
    transformers reloads exactly those layers unquantized."""
    from transformers import AutoModelForCausalLM

    from llmopt.quantize import QuantizeOptions, quantize

    src = tiny_model_dir("qwen2", num_hidden_layers=11)
    out = tmp_path / "q"
    summary = quantize(QuantizeOptions(model=str(src), output=str(out), method="llm-int8",
                                       skip=["model.layers.1", "*.down_proj"]))
    expected = {f"model.layers.1.{m}" for m in SEVEN} | {f"model.layers.{i}.mlp.down_proj" for i in range(11)}
    assert set(summary["kept_layers"]) == expected | {"lm_head"}
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"})
    assert {n for n, m in reloaded.named_modules() if type(m) is torch.nn.Linear} == expected | {"lm_head"}


@needs_bnb
def test_bf16_source_keeps_bf16_unquantized_tensors_and_reloads(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llmopt.quantize import QuantizeOptions, quantize

    src = tiny_model_dir("qwen2")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    out = tmp_path / "q"
    summary = quantize(QuantizeOptions(model=str(src), output=str(out), method="llm-int8"))
    assert summary["source_dtype"] == "bfloat16" and summary["dtype"] == "float32"
    tensors = load_file(out / "model.safetensors")
    plain = {k: t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(".SCB")}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= set(plain)
    assert set(plain.values()) == {torch.bfloat16}
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map={"": "cpu"})
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        a, b = reloaded(torch.tensor(PROMPT_IDS)).logits, original(torch.tensor(PROMPT_IDS)).logits
    assert (torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 5e-2


@needs_bnb
@pytest.mark.parametrize("method", ["llm-int8", "nf4"])
def test_moe_with_fused_experts_is_refused(method, tiny_tokenizer, tmp_path, cli):
    """transformers' bitsandbytes integration replaces nn.Linear only: fused experts would stay float."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2)
    src = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    code, _, err = cli("quantize", src, "-o", tmp_path / "out", "--method", method)
    assert code == 2 and "mlp.experts.gate_up_proj" in err and "cannot quantize" in err, err
    assert not (tmp_path / "out").exists()


@needs_bnb
def test_cpu_4bit_refuses_widths_its_kernel_cannot_run(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")                                 # intermediate 160: not a multiple of 64
    code, _, err = cli("quantize", src, "-o", tmp_path / "out", "--method", "nf4", "--device", "cpu")
    assert code == 2 and "down_proj (160->64)" in err and "--skip" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("quantize", src, "-o", tmp_path / "out", "--method", "nf4", "--skip", "mlp.down_proj")
    assert code == 0, err


def test_refuses_existing_output_and_quantized_source(quantized, tiny_src, cli):
    out, _, _ = quantized["nf4"]
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli("quantize", tiny_src, "-o", out, "--method", "nf4")
    assert code == 2 and "already exists" in err, err
    assert sorted(p.name for p in out.iterdir()) == before
    code, _, err = cli("quantize", out, "-o", out.parent / "again", "--method", "llm-int8")
    assert code == 2 and "already quantized" in err, err
    assert not (out.parent / "again").exists()


def test_missing_bitsandbytes_says_the_pip_command(monkeypatch, tiny_src, tmp_path, cli):
    from llmopt.models import load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)      # import bitsandbytes -> ImportError
    code, _, err = cli("quantize", tiny_src, "-o", tmp_path / "out", "--method", "llm-int8")
    assert code == 2, err
    assert "pip install 'llmopt[bnb]'" in err and "bitsandbytes" in err, err
    assert list(tmp_path.iterdir()) == []
    saved = tmp_path / "saved"                                  # what a bitsandbytes output declares
    saved.mkdir()
    config = json.loads((tiny_src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="bitsandbytes") as e:
        load_model(str(saved), device="cpu")
    assert "pip install 'llmopt[bnb]'" in str(e.value)


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
@needs_bnb
def test_smollm2_llm_int8_keeps_perplexity(smollm2, tmp_path, wikitext_dir):
    """On real weights LLM.int8 is close to lossless; a short check (the full bar is in benchmarks/)."""
    from llmopt.bench.quality import perplexity
    from llmopt.data import text_windows
    from llmopt.models import load_model
    from llmopt.quantize import QuantizeOptions, quantize

    summary = quantize(QuantizeOptions(model="smollm2-135m", output=str(tmp_path / "int8"), method="llm-int8",
                                       device="cpu"))
    assert summary["quantized_layers"] == 30 * 7 and summary["weight_rel_error_mean"] < 0.01
    windows, _ = text_windows(smollm2.tokenizer, "wikitext2", "eval", 256, max_windows=4, directory=wikitext_dir)
    base = perplexity(smollm2.model, windows)
    quant = perplexity(load_model(summary["output"], device="cpu").model, windows)
    assert abs(quant / base - 1) < 0.02, (base, quant)
