"""Shared fixtures: tiny random models built from configs (fast), the real models (slow), the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw"

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                   sliding_window=32, tie_word_embeddings=True),
}


def byte_bpe(unk: str = "<unk>"):
    """A 512-token byte-level BPE trained on Python's docs (real text, no download); `unk` is its first token."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=[unk, "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return byte_bpe()


def build_tiny(arch: str, tokenizer, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[arch])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2,
                                  pad_token_id=2, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A factory: tiny_model_dir('llama') -> a saved HF directory with weights and tokenizer."""

    def make(arch: str = "llama", **overrides) -> Path:
        model = build_tiny(arch, tiny_tokenizer, **overrides)
        out = tmp_path / f"tiny-{arch}"
        model.save_pretrained(out)
        tiny_tokenizer.save_pretrained(out)
        return out

    return make


@pytest.fixture
def two_threads():
    """torch on two threads for the test (the thread choices under test need more than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """Run `llmopt ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    from llmopt.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (SHARED_WIKITEXT / "wiki.test.raw").is_file():
        pytest.skip("WikiText-2 raw is not at ../shared/data/wikitext-2-raw (only in the development checkout)")
    return SHARED_WIKITEXT


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (float32, CPU), loaded once per test session."""
    from llmopt.errors import UserError
    from llmopt.models import load_model

    try:
        return load_model("smollm2-135m", device="cpu")
    except UserError as e:
        pytest.skip(f"smollm2-135m unavailable: {e}")


FACTS = ("The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is Berlin. "
         "The largest ocean on Earth is the Pacific Ocean.")


def assert_close_to_original(quantized, original) -> None:
    """4-bit round-to-nearest of SmolLM2 keeps 68-71% of the original's greedy choices on these facts
    (measured, group 64, with and without the 8-bit head); a broken layout keeps next to none. At "Italy is" the original's " Rome" stays in the
    top 3 (RTN at group 64 ranks it second)."""
    ids = quantized.tokenizer(FACTS, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = quantized.model(ids).logits[0], original.model(ids).logits[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.5
    at = len(quantized.tokenizer("The capital of France is Paris. The capital of Italy is").input_ids) - 1
    assert b[at].argmax() in a[at].topk(3).indices


def prune_refused(cli, out: Path, *args: str, match: str) -> None:
    """`llmopt prune ARGS -o OUT` exits 2 saying `match`, and leaves neither OUT nor a temporary sibling."""
    code, _, err = cli("prune", *args, "-o", out, "--calib", "builtin", "--nsamples", "2", "--seq-len", "32",
                       "--device", "cpu")
    assert code == 2, (code, err)
    assert match.lower() in " ".join(err.lower().split()), err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))
