"""Checkpoints that do not fill the model exactly, or cannot be read safely, are refused with exit 2.

Transformers random-initialises what a checkpoint lacks and only logs it, and the CLI silences its
logs; these tests pin that llmopt refuses such checkpoints with one line that names the tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmopt.errors import UserError
from llmopt.models import ALIASES, load_model

DROPPED = ("model.layers.1.mlp.down_proj.weight", "model.norm.weight")


def _rewrite(path: Path, edit) -> Path:
    """Apply edit(state_dict) to the directory's model.safetensors."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def _exit2(cli, *args) -> str:
    """Run the CLI, expect exit 2 and exactly one `error:` line (progress lines may precede it); return it."""
    code, out, err = cli(*args)
    assert code == 2, (code, err)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture
def missing_dir(tiny_model_dir):
    return _rewrite(tiny_model_dir("llama"), lambda sd: [sd.pop(k) for k in DROPPED])


@pytest.mark.parametrize("command, extra", [
    ("info", []), ("generate", ["hi", "--max-new-tokens", "2"]), ("quantize", ["--method", "rtn", "-o", "OUT"]),
    ("quantize", ["--method", "llm-int8", "-o", "OUT"]), ("quantize", ["--method", "nf4", "--skip", "down_proj", "-o", "OUT"]),
])
def test_missing_tensors_exit_2_naming_them(missing_dir, cli, tmp_path, command, extra):
    out = tmp_path / "quantized"
    err = _exit2(cli, command, missing_dir, *[out if a == "OUT" else a for a in extra])
    assert "missing 2 tensors" in err and all(k in err for k in DROPPED), err
    assert not out.exists()


def test_unexpected_tensor_exit_2_naming_it(tiny_model_dir, cli):
    path = _rewrite(tiny_model_dir("llama"), lambda sd: sd.update({"model.layers.7.extra.weight": torch.zeros(3)}))
    err = _exit2(cli, "info", path)
    assert "unexpected 1" in err and "model.layers.7.extra.weight" in err, err


def test_misshaped_tensor_exit_2_naming_shapes(tiny_model_dir, cli):
    key = "model.layers.1.mlp.down_proj.weight"
    path = _rewrite(tiny_model_dir("llama"), lambda sd: sd.update({key: sd[key].t().contiguous()}))
    err = _exit2(cli, "info", path)
    assert "wrong shape" in err and key in err and "[160, 64]" in err and "[64, 160]" in err, err


def test_many_missing_tensors_name_a_few_and_count_all(tiny_model_dir):
    path = _rewrite(tiny_model_dir("llama"), lambda sd: [sd.pop(k) for k in list(sd) if ".layers." in k])
    with pytest.raises(UserError, match=r"missing 27 tensors \(model\.layers\..*, \.\.\.\)") as e:
        load_model(str(path), device="cpu")
    assert str(e.value).count("model.layers.") == 3


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tied_lm_head_absent_and_buffers_are_not_missing(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    assert not any(k.startswith("lm_head") or "inv_freq" in k for k in load_file(path / "model.safetensors"))
    loaded = load_model(str(path), device="cpu")
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_untied_lm_head_present_loads(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("qwen2")), device="cpu")
    assert loaded.model.lm_head.weight.data_ptr() != loaded.model.get_input_embeddings().weight.data_ptr()


def test_truncated_safetensors_exit_2(tiny_model_dir, cli):
    path = tiny_model_dir("llama")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _exit2(cli, "info", path)
    assert "model.safetensors" in err and "truncated or damaged" in err, err


def test_not_a_gguf_file_exit_2(cli, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 certainly not gguf" * 8)
    err = _exit2(cli, "info", fake)
    assert "not a GGUF file" in err, err


class _Payload:
    """Unpickling this runs a shell command: the checkpoint loader must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bin_with_code_is_refused_and_never_run(tiny_model_dir, cli, tmp_path):
    path = tiny_model_dir("llama")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**tensors, "payload": _Payload(marker)}, path / "pytorch_model.bin")
    err = _exit2(cli, "info", path)
    assert "pytorch_model.bin" in err and "posix.system" in err and "safetensors" in err, err
    assert not marker.exists()


def test_plain_tensor_bin_still_loads(tiny_model_dir):
    path = tiny_model_dir("llama")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    loaded = load_model(str(path), device="cpu")
    assert torch.equal(loaded.model.model.norm.weight, tensors["model.norm.weight"])


def test_config_not_json_exit_2(tiny_model_dir, cli):
    path = tiny_model_dir("llama")
    (path / "config.json").write_text('{"model_type": "llama",')
    err = _exit2(cli, "info", path)
    assert "config.json is not valid JSON" in err, err


# ----------------------------------------------------------------------------- alias storage dtype

def test_alias_cache_is_bfloat16_and_stale_float32_is_not_reused(monkeypatch, tmp_path, tiny_tokenizer):
    """The converted alias is stored like the hub original (bfloat16); an older float32 cache is not reused."""
    import llmopt.models as models
    from conftest import build_tiny

    monkeypatch.setenv("LLMOPT_HOME", str(tmp_path))
    stale = tmp_path / "models" / "smollm2-135m"
    build_tiny("llama", tiny_tokenizer).save_pretrained(stale)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    asked: list[torch.dtype] = []

    def fake_load(path, dtype):
        asked.append(dtype)
        return build_tiny("llama", tiny_tokenizer).to(dtype), tiny_tokenizer

    monkeypatch.setattr(models, "_alias_gguf", lambda alias, cache: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    alias = ALIASES["smollm2-135m"]
    target = models.materialize_alias(alias)
    assert asked == [torch.bfloat16]
    assert json.loads((target / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(target / "model.safetensors").values()} == {torch.bfloat16}
    assert models.materialize_alias(alias) == target and asked == [torch.bfloat16]   # reused, not redone
    loaded = load_model("smollm2-135m", device="cpu", dtype="auto")
    assert loaded.path == target and next(loaded.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_aliases_are_stored_in_bfloat16_like_the_originals(name):
    assert ALIASES[name].dtype == "bfloat16"


@pytest.mark.slow
def test_smollm2_alias_on_disk_is_bfloat16_and_loads_float32(smollm2):
    config = json.loads((smollm2.path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    size = (smollm2.path / "model.safetensors").stat().st_size
    assert 268e6 < size < 271e6, size          # what users download from the hub: ~269 MB
    assert {p.dtype for p in smollm2.model.parameters()} == {torch.float32}


def test_truncated_bin_exit_2(tiny_model_dir, cli):
    path = tiny_model_dir("llama")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    err = _exit2(cli, "info", path)
    assert "pytorch_model.bin is truncated or damaged" in err, err


# ----------------------------------------------------------------------------- llmopt's own GPTQ loader

@pytest.fixture
def gptq_dir(tiny_model_dir, cli, tmp_path):
    out = tmp_path / "gptq"
    code, _, err = cli("quantize", tiny_model_dir("qwen2"), "-o", out, "--method", "rtn", "--group-size", "32")
    assert code == 0, err
    return out


@pytest.mark.parametrize("damage, expect", [
    (lambda sd: sd.pop("model.norm.weight"), "missing 1 tensor (model.norm.weight)"),
    (lambda sd: sd.update({"model.layers.9.extra.weight": torch.zeros(3)}),
     "unexpected 1 tensor (model.layers.9.extra.weight)"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(65)}),
     "wrong shape for 1 tensor (model.norm.weight is [65] in the file, [64] in the model)"),
], ids=["missing", "unexpected", "misshaped"])
def test_gptq_checkpoint_that_does_not_fit_exit_2(gptq_dir, cli, damage, expect):
    _rewrite(gptq_dir, damage)
    err = _exit2(cli, "info", gptq_dir)
    assert expect in err, err


def test_gptq_truncated_safetensors_exit_2(gptq_dir, cli):
    data = (gptq_dir / "model.safetensors").read_bytes()
    (gptq_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = _exit2(cli, "info", gptq_dir)
    assert "model.safetensors is truncated or damaged" in err, err


# ----------------------------------------------------------------------------- GGUF tokenizer conversion

def _gguf_metadata(path: Path, add_bos: bool | None) -> Path:
    """A GGUF file holding only tokenizer metadata (no tensors)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_a_gguf_tokenizer_converted_without_the_bos_its_file_asks_for_is_refused(add_bos, tmp_path, tiny_tokenizer):
    """The tiny tokenizer has a BOS token but does not put it first, as transformers < 5.23 converted Gemma3's."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers.processors import TemplateProcessing

    import llmopt.models as models

    path = _gguf_metadata(tmp_path / "m.gguf", add_bos)
    if add_bos:
        with pytest.raises(UserError, match="without the BOS token"):
            models.check_gguf_tokenizer(path, tiny_tokenizer)
        import transformers

        with pytest.MonkeyPatch.context() as mp:       # the loader checks before it converts any weight
            mp.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
            mp.setattr(models, "from_pretrained_checked", lambda *a, **k: pytest.fail("weights loaded"))
            with pytest.raises(UserError, match="transformers>=5.23"):
                models._load_gguf(path, torch.float32)
    else:
        models.check_gguf_tokenizer(path, tiny_tokenizer)
    with_bos = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>")
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    models.check_gguf_tokenizer(path, with_bos)          # puts BOS first: accepted whatever the file says


def test_an_alias_cache_converted_before_the_tokenizer_check_is_converted_again(monkeypatch, tmp_path,
                                                                                tiny_tokenizer):
    import llmopt.models as models
    from conftest import build_tiny

    monkeypatch.setenv("LLMOPT_HOME", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    loads: list[torch.dtype] = []
    monkeypatch.setattr(models, "_alias_gguf", lambda alias, cache: gguf)
    monkeypatch.setattr(models, "_load_gguf",
                        lambda path, dtype: loads.append(dtype) or (build_tiny("llama", tiny_tokenizer).to(dtype),
                                                                    tiny_tokenizer))
    alias = ALIASES["gemma3-270m"]
    target = models.materialize_alias(alias)
    source = target / "SOURCE.txt"
    assert len(loads) == 1 and models.materialize_alias(alias) == target and len(loads) == 1
    source.write_text(source.read_text().replace(models._CHECKED, ""))       # as an older llmopt wrote it
    assert models.materialize_alias(alias) == target and len(loads) == 2
