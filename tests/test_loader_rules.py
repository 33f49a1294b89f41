"""The rules other GPTQ loaders enforce, applied to checkpoints llmopt writes, without those loaders.

benchmarks/interop_gptqmodel.py loads llmopt's checkpoints with transformers and GPTQModel in an
environment of its own (docs/formats.md has its table); CI has neither, so this file encodes what
they check, written from their behaviour and code rather than from llmopt's packing:

- transformers' `GPTQConfig` parses `quantization_config` (bits 2/3/4/8, damp_percent inside (0, 1),
  `format` / `checkpoint_format`);
- every quantized Linear's input width is a multiple of its group size: transformers' default GPTQ
  path, GPTQModel's default CPU kernel (`_weight_int4pack_mm_cpu`) and vLLM's GPTQ layer refuse a
  partial last group (SmolLM2's 576 with group 128 was the case);
- the group size is one GPTQModel's kernels list (-1, 16, 32, 64, 128); a 4-bit per-channel layer
  runs on GPTQModel's default CPU kernel as one group of its input width, which must then be 32, 64,
  128 or 256;
- qweight / qzeros / scales / g_idx have the shapes and dtypes the loaders allocate before copying;
- codes are packed LSB first along the input dimension (qweight) and the output dimension (qzeros),
  classic `gptq` zeros stored minus one: unpacked that way they give back the source weights;
- a decoder Linear left unquantized is excluded through `dynamic` ("-:" regex: GPTQModel) and through
  `modules_in_block_to_quantize` (transformers via optimum: a Linear of the blocks is quantized when its
  full name ends with a listed name), the ways these loaders know to keep it a plain Linear.

The models are tiny LLaMA / Qwen2 configs whose widths (64, 96, 160) are not multiples of the default
group size 128.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmopt.quantize import QuantizeOptions, quantize

KERNEL_GROUP_SIZES = (-1, 16, 32, 64, 128)
CONFIG_KEYS = {"quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential",
               "static_groups", "lm_head", "format", "checkpoint_format", "pack_dtype", "meta"}


def _opts(model: Path, out: Path, **kw) -> QuantizeOptions:
    base = dict(calib="builtin", nsamples=4, seq_len=32, device="cpu")
    return QuantizeOptions(model=str(model), output=str(out), **{**base, **kw})


def _unpack(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Codes from int32 words read as one LSB-first bit stream along `dim` (0: qweight, 1: qzeros)."""
    w = words if dim == 0 else words.t()                                   # [words, lines]
    stream = ((w.unsqueeze(-1).long() >> torch.arange(32)) & 1)            # [words, lines, 32]
    stream = stream.permute(1, 0, 2).reshape(w.shape[1], -1)[:, : count * bits]
    codes = (stream.reshape(w.shape[1], count, bits) << torch.arange(bits)).sum(-1)
    return codes.t() if dim == 0 else codes                                # qweight: [K, N]; qzeros: [G, N]


def _grid(qcfg: dict, module: str) -> tuple[int, int] | None:
    """(bits, group_size) as GPTQModel resolves `dynamic` for a module; None when excluded."""
    for key, override in (qcfg.get("dynamic") or {}).items():
        sign, _, pattern = key.rpartition(":")
        if re.match(pattern, module):
            if sign == "-":
                return None
            return override.get("bits", qcfg["bits"]), override.get("group_size", qcfg["group_size"])
    return qcfg["bits"], qcfg["group_size"]


def check_loader_rules(src: Path, out: Path) -> dict:
    """Apply every rule of the module docstring to checkpoint `out` made from `src`; returns its config."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    cfg = json.loads((out / "config.json").read_text())
    qcfg = cfg["quantization_config"]
    assert CONFIG_KEYS <= set(qcfg) and qcfg["quant_method"] == "gptq" and qcfg["pack_dtype"] == "int32"
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    # raises on what transformers refuses; it checks optimum's version when modules_in_block_to_quantize
    # is set (GPTQ loading needs optimum anyway), and CI has no optimum: that key is checked below
    parsed = GPTQConfig.from_dict({k: v for k, v in qcfg.items() if k != "modules_in_block_to_quantize"})
    assert (parsed.bits, parsed.group_size, parsed.format) == (qcfg["bits"], qcfg["group_size"],
                                                                qcfg["checkpoint_format"])
    assert qcfg["checkpoint_format"] == qcfg["format"] == ("gptq" if qcfg["sym"] else "gptq_v2")

    source = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tensors = load_file(out / "model.safetensors")
    linears = {n: m for n, m in source.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    listed = sum(qcfg.get("modules_in_block_to_quantize") or [], [])
    for name, lin in linears.items():
        grid = _grid(qcfg, name)
        assert not listed or (grid is not None) == any(name.endswith(n) for n in listed), name   # optimum's rule
        if grid is None:                                                   # excluded: a plain Linear
            assert f"{name}.weight" in tensors and f"{name}.qweight" not in tensors, name
            continue
        assert f"{name}.qweight" in tensors and f"{name}.weight" not in tensors, name
        _check_linear(name, lin, grid, qcfg["checkpoint_format"], tensors)
    return qcfg


def _check_linear(name: str, lin: torch.nn.Linear, grid: tuple[int, int], fmt: str, tensors: dict) -> None:
    bits, group = grid
    k, n = lin.in_features, lin.out_features
    assert group in KERNEL_GROUP_SIZES, f"{name}: group size {group}"
    assert group == -1 or k % group == 0, f"{name}: input width {k} is not a multiple of group size {group}"
    assert not (bits == 4 and group == -1) or k in (32, 64, 128, 256), f"{name}: 4-bit per channel, width {k}"
    groups = 1 if group == -1 else k // group
    t = {p: tensors[f"{name}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
    assert (t["qweight"].dtype, tuple(t["qweight"].shape)) == (torch.int32, (k * bits // 32, n)), name
    assert (t["qzeros"].dtype, tuple(t["qzeros"].shape)) == (torch.int32, (groups, n * bits // 32)), name
    assert (t["scales"].dtype, tuple(t["scales"].shape)) == (torch.float16, (groups, n)), name
    assert (t["g_idx"].dtype, tuple(t["g_idx"].shape)) == (torch.int32, (k,)), name
    expected_g_idx = torch.zeros(k) if group == -1 else torch.arange(k) // group
    assert torch.equal(t["g_idx"].long(), expected_g_idx.long()), name
    q = _unpack(t["qweight"], bits, k, 0)
    zeros = _unpack(t["qzeros"], bits, n, 1) + (1 if fmt == "gptq" else 0)
    g = t["g_idx"].long()
    w = ((q - zeros[g]).float() * t["scales"].float()[g]).t()             # [N, K]
    ref = lin.weight.detach().float()
    # a 2-bit grid is coarse but unbiased; a mis-ordered word or a zero off by one is far off
    limit = {2: 0.75, 3: 0.35, 4: 0.2, 8: 0.02}[bits]
    assert float(torch.linalg.norm(w - ref) / torch.linalg.norm(ref)) < limit, name


CASES = {
    "llama gptq default": ("llama", {}, dict()),
    "llama gptq 3-bit": ("llama", {}, dict(bits=3)),
    "llama gptq 2-bit asym": ("llama", {}, dict(bits=2, sym=False, desc_act=False)),
    "qwen2 gptq asym": ("qwen2", {}, dict(sym=False)),
    "qwen2 rtn 8-bit": ("qwen2", {}, dict(method="rtn", bits=8)),
    "qwen2 hidden 96 rtn": ("qwen2", dict(hidden_size=96, intermediate_size=256), dict(method="rtn")),
    "llama int8": ("llama", {}, dict(method="int8")),
    "qwen2 rtn 4-bit per channel": ("qwen2", {}, dict(method="rtn", group_size=-1)),     # widths 64 / 128
    "llama rtn skip down_proj": ("llama", {}, dict(method="rtn", skip=["down_proj"])),
    "llama rtn skip one layer's down_proj": ("llama", {}, dict(method="rtn", skip=["model.layers.1.mlp.down_proj"])),
    "llama gptq 8-bit lm_head": ("llama", {}, dict(bits=8, lm_head=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_written_checkpoints_follow_the_loaders_rules(case, tiny_model_dir, tmp_path):
    arch, shape, kw = CASES[case]
    src = tiny_model_dir(arch, **shape)
    out = tmp_path / "q"
    quantize(_opts(src, out, **kw))
    qcfg = check_loader_rules(src, out)
    if kw.get("method") != "int8" and kw.get("group_size") != -1:
        # widths 64/160 (llama), 64/128 (qwen2), 96/256: the largest power of two up to 128 dividing all;
        # skipping down_proj (160) leaves llama's 64
        expected = {"llama": 64 if kw.get("skip") == ["down_proj"] else 32, "qwen2": 32 if shape else 64}[arch]
        assert qcfg["group_size"] == expected
    if kw.get("skip") == ["down_proj"]:
        assert set(qcfg["dynamic"]) == {f"-:^model[.]layers[.]{i}[.]mlp[.]down_proj$" for i in range(3)}
        assert qcfg["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"]]
    elif "skip" in kw:        # not the same in every block: full names, which match nothing else
        listed = qcfg["modules_in_block_to_quantize"][0]
        assert len(listed) == 3 * 7 - 1 and all(n.startswith("model.layers.") for n in listed)
    else:
        assert "modules_in_block_to_quantize" not in qcfg


def test_group_size_change_is_said_once_and_recorded(tiny_model_dir, tmp_path, cli):
    """The default 128 on widths 64 / 160: group 32 is written, one note line says why, and llmopt.json
    keeps both the requested and the used size."""
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    code, _, err = cli("quantize", src, "-o", out, "--method", "rtn")
    assert code == 0, err
    text = " ".join(err.split())                                           # the console wraps long lines
    assert text.count("group size") == 2 and text.count("note: group size 32, not 128: ") == 1, err
    assert "model.layers.0.mlp.down_proj has input width 160" in text, err
    record = json.loads((out / "llmopt.json").read_text())
    assert record["parameters"]["group_size"] == 128
    assert record["metrics"]["group_size_requested"] == 128 and record["quantization"]["group_size"] == 32


def test_a_group_size_that_divides_is_kept_without_a_note(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    out = tmp_path / "q"
    code, _, err = cli("quantize", src, "-o", out, "--method", "rtn")
    assert code == 0, err
    assert "group size" not in err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 128


@pytest.mark.parametrize("damp", ["0", "1"])
def test_damp_transformers_refuses_is_refused_before_writing(damp, tiny_model_dir, tmp_path, cli):
    out = tmp_path / "q"
    code, _, err = cli("quantize", tiny_model_dir("llama"), "-o", out, "--damp", damp)
    assert code == 2 and "--damp must be between 0 and 1" in err and not out.exists()


def test_4bit_per_channel_on_widths_the_int4_cpu_kernel_refuses_exits_2(tiny_model_dir, tmp_path, cli):
    """llama's down_proj is 160 wide: GPTQModel's default CPU kernel would run it as one group of 160."""
    out = tmp_path / "q"
    code, _, err = cli("quantize", tiny_model_dir("llama"), "-o", out, "--method", "rtn", "--group-size", "-1")
    text = " ".join(err.split())
    assert code == 2 and "4-bit per channel" in text and "input width 160" in text, err
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_what_transformers_cannot_read_is_said(tiny_model_dir, tmp_path, cli):
    """transformers does not read a quantized head (benchmarks/interop_gptqmodel.py): one note."""
    code, _, err = cli("quantize", tiny_model_dir("llama"), "-o", tmp_path / "q", "--method", "rtn", "--lm-head")
    text = " ".join(err.split())
    assert code == 0 and text.count("not in transformers' from_pretrained") == 1, err


@pytest.mark.parametrize("flags", [[], ["--skip", "down_proj"]])    # kept Linears: modules_in_block_to_quantize
def test_a_checkpoint_transformers_reads_has_no_loader_note(flags, tiny_model_dir, tmp_path, cli):
    code, _, err = cli("quantize", tiny_model_dir("llama"), "-o", tmp_path / "q", "--method", "rtn", *flags)
    assert code == 0 and "from_pretrained" not in err, err
