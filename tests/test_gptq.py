"""GPTQ / RTN / int8 in the standard GPTQ layout: packing, the solver, the runtime, the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_original
from safetensors.torch import load_file, save_file

from llmopt.errors import UserError
from llmopt.models import load_model
from llmopt.quantize import QuantizeOptions, quantize
from llmopt.quantize import packing
from llmopt.quantize.gptq import HessianAccumulator, QuantSpec, gptq_quantize, relative_output_error, \
    rtn_quantize
from llmopt.quantize.qlinear import QuantLinear
from llmopt.quantize.runtime import module_grid

# ----------------------------------------------------------------------------- an independent reader

def read_stream(words: list[int], bits: int, count: int) -> list[int]:
    """The format description, literally: int32 words form one little-endian bit stream, value j
    sits at bits j*bits .. j*bits+bits-1."""
    stream = 0
    for i, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(count)]


def reference_dequantize(t: dict[str, torch.Tensor], bits: int, fmt: str, k: int, n: int) -> torch.Tensor:
    """W [N, K] from qweight/qzeros/scales/g_idx, written from docs/formats.md, not from packing.py."""
    qweight, qzeros = t["qweight"].tolist(), t["qzeros"].tolist()
    q = [read_stream([row[c] for row in qweight], bits, k) for c in range(n)]           # [N][K]
    zeros = [read_stream(row, bits, n) for row in qzeros]                               # [G][N]
    if fmt == "gptq":
        zeros = [[z + 1 for z in row] for row in zeros]
    scales, g_idx = t["scales"].float(), t["g_idx"].tolist()
    w = torch.empty(n, k)
    for c in range(n):
        for j in range(k):
            g = g_idx[j]
            w[c, j] = (q[c][j] - zeros[g][c]) * scales[g, c]
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_pack_round_trip_matches_independent_reader(bits, fmt):
    torch.manual_seed(bits)
    k, n, g = 64, 32, 16
    maxq = (1 << bits) - 1
    q = torch.randint(0, maxq + 1, (n, k), dtype=torch.int32)
    lo = 1 if fmt == "gptq" else 0
    zeros = torch.randint(lo, maxq + 1, (k // g, n), dtype=torch.int32)
    scales = torch.rand(k // g, n) + 0.1
    g_idx = packing.default_g_idx(k, g)
    t = packing.pack_layer(q, scales, zeros, g_idx, bits, fmt)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k * bits // 32, n)
    assert t["qzeros"].shape == (k // g, n * bits // 32) and t["scales"].dtype == torch.float16
    expected = (q.float() - zeros.t()[:, g_idx.long()].float()) * scales.half().float().t()[:, g_idx.long()]
    assert torch.equal(reference_dequantize(t, bits, fmt, k, n), expected)
    q2, z2, s2, g2 = packing.unpack_layer(t, bits, fmt, k, n)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(g2, g_idx.long())


def test_three_bit_values_straddle_words():
    codes = torch.arange(32).remainder(8).to(torch.int32).unsqueeze(1)     # 32 values -> 3 words
    words = packing.pack_rows(codes, 3)[:, 0].tolist()
    assert len(words) == 3
    # value 10 occupies bits 30..32: two bits in word 0, one in word 1
    assert ((words[0] & 0xFFFFFFFF) >> 30) == (codes[10, 0].item() & 3)
    assert (words[1] & 1) == (codes[10, 0].item() >> 2)
    assert read_stream(words, 3, 32) == codes[:, 0].tolist()


def test_classic_format_refuses_zero_point_zero():
    with pytest.raises(ValueError, match="gptq_v2"):
        packing.pack_layer(torch.zeros(4, 32, dtype=torch.int32), torch.ones(1, 4), torch.zeros(1, 4),
                           torch.zeros(32), 4, "gptq")


# ----------------------------------------------------------------------------- the solver

def _correlated(k: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs driven by a few shared factors (as real activations are), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k // 8, k, generator=g)
    return torch.randn(tokens, k // 8, generator=g) @ mix + 0.3 * torch.randn(tokens, k, generator=g)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], x.device)
    for chunk in x.split(500):
        acc.add(chunk)
    return acc.h


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 64, False), QuantSpec(4, -1, True)])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_below_rtn(spec, desc_act):
    x = _correlated(128)
    w = torch.randn(48, 128)
    h = _hessian(x)
    gptq = gptq_quantize(w, h, spec, desc_act=desc_act, block_size=32)
    rtn = rtn_quantize(w, spec)
    err = lambda wq: torch.linalg.norm(x @ (w - wq).t()).item()   # noqa: E731
    assert err(gptq.dequantize()) < 0.7 * err(rtn.dequantize())
    # the reported metric is the same quantity, computed from H alone
    rel = err(gptq.dequantize()) ** 2 / torch.linalg.norm(x @ w.t()).item() ** 2
    assert gptq.error == pytest.approx(rel, rel=1e-3)


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False)])
def test_range_search_lowers_rounding_error_on_heavy_tails(bits, sym):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))     # a few large weights per group
    plain = rtn_quantize(w, QuantSpec(bits, 64, sym))
    searched = rtn_quantize(w, QuantSpec(bits, 64, sym, mse=True))
    assert searched.error < 0.9 * plain.error
    # the searched grid is a shrunk one: never a larger step than min/max
    assert (searched.scales <= plain.scales + 1e-7).all()
    h = _hessian(_correlated(256))
    assert gptq_quantize(w, h, QuantSpec(bits, 64, sym, mse=True)).error < \
        relative_output_error(w, searched.dequantize(), h)


def test_hessian_is_running_mean_of_2xxt():
    x = torch.randn(300, 16)
    assert torch.allclose(_hessian(x), 2 * x.t() @ x / 300, atol=1e-5)


def test_dead_inputs_and_failed_cholesky_are_handled():
    x = _correlated(64)
    x[:, 5] = 0                                             # a dead input channel
    w = torch.randn(16, 64)
    notes = []
    r = gptq_quantize(w, _hessian(x), QuantSpec(4, 32, True), note=notes.append)
    assert torch.isfinite(r.dequantize()).all() and r.damp == 0.01
    # rank-deficient H with no dampening: the factorisation fails and is retried with more
    low_rank = torch.randn(64, 4)
    r = gptq_quantize(w, low_rank @ low_rank.t(), QuantSpec(4, 32, True), damp=0.0, note=notes.append)
    assert r.damp > 0 and any("used damp" in n for n in notes)


def test_act_order_uses_static_groups_so_g_idx_alone_maps_columns():
    k, g = 128, 32
    x = _correlated(k) * torch.randperm(k).float().add(1).sqrt()   # activity in shuffled column order
    h = _hessian(x)
    assert not torch.equal(torch.argsort(torch.diag(h), descending=True), torch.arange(k))
    w = torch.randn(24, k)
    r = gptq_quantize(w, h, QuantSpec(4, g, True), desc_act=True)
    assert torch.equal(r.g_idx.long(), torch.arange(k) // g)
    # reading the checkpoint with nothing but g_idx reproduces the solver's weights exactly
    t = packing.pack_layer(r.q, r.scales, r.zeros, r.g_idx, 4, "gptq")
    q, z, s, gi = packing.unpack_layer(t, 4, "gptq", k, 24)
    assert torch.allclose(packing.dequantize(q, z, s, gi), r.dequantize(), atol=2e-3 * r.scales.max().item())
    # every group's scale is the one computed from that group's original columns
    for j in range(k // g):
        cols = w[:, j * g:(j + 1) * g]
        assert torch.allclose(r.scales[j], 2 * cols.abs().max(1).values / 15, rtol=1e-5)


# ----------------------------------------------------------------------------- the runtime module

@pytest.mark.parametrize("n,k,bits,group,sym", [
    (96, 576, 4, 128, True),      # K = 4.5 groups: padded input, partial last group
    (40, 256, 4, 64, False),      # asymmetric, N not a multiple of the kernel block
    (64, 320, 4, -1, True),       # per channel: scale repeated over kernel groups
    (64, 192, 8, -1, True),       # int8 kernel
    (64, 192, 8, -1, False),      # int8 kernel with zero-point correction
    (64, 192, 3, 64, True),       # no kernel: dequantized on the fly
])
def test_kernel_path_equals_dequantize_path(n, k, bits, group, sym):
    torch.manual_seed(0)
    r = rtn_quantize(torch.randn(n, k), QuantSpec(bits, group, sym))
    bias = torch.randn(n)
    m = QuantLinear(r.q, r.zeros, r.scales, r.g_idx, bias, bits, group)
    assert m.mode == {4: "int4", 8: "int8", 3: "dequant"}[bits]
    x = torch.randn(2, 5, k)
    reference = x @ r.dequantize().t() + bias
    kernel, dequant = m.forward_kernel(x), m.forward_dequant(x)
    rel = lambda a: (torch.linalg.norm(a - reference) / torch.linalg.norm(reference)).item()  # noqa: E731
    assert kernel.shape == reference.shape
    assert rel(kernel) < 1e-2 and rel(dequant) < 1e-2          # bf16 activations / scales
    assert torch.allclose(m(x), kernel if bits != 3 else dequant)
    assert m.n_logical_params() == n * k + n


def test_unsorted_g_idx_from_other_tools_is_reordered_once():
    torch.manual_seed(1)
    k, n, g = 256, 64, 64
    r = rtn_quantize(torch.randn(n, k), QuantSpec(4, g, True))
    perm = torch.randperm(k)
    q, g_idx = r.q[:, perm], r.g_idx[perm]            # act-order without static groups
    m = QuantLinear(q, r.zeros, r.scales, g_idx, None, 4, g)
    assert m.mode == "int4" and m.perm is not None
    x = torch.randn(3, k)
    reference = x @ packing.dequantize(q, r.zeros, r.scales, g_idx.long()).t()
    assert (torch.linalg.norm(m(x) - reference) / torch.linalg.norm(reference)) < 1e-2


# ----------------------------------------------------------------------------- the command

def _opts(model, out, **kw) -> QuantizeOptions:
    base = dict(calib="builtin", nsamples=8, seq_len=32, device="cpu")
    base.update(kw)
    return QuantizeOptions(model=str(model), output=str(out), **base)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _dequantized_reference(src: Path, out: Path):
    """The source model with every quantized weight replaced by the independent reader's W."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(out / "model.safetensors")
    for key in [k for k in tensors if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        lin = model.get_submodule(prefix)
        parts = {p: tensors[f"{prefix}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")}
        bits = module_grid(cfg, prefix, cfg["bits"], cfg["group_size"])[0]     # lm_head: its dynamic override
        lin.weight.data = reference_dequantize(parts, bits, cfg["checkpoint_format"], lin.in_features,
                                               lin.out_features)
    return model.eval()


@pytest.mark.parametrize("arch,kw", [
    ("llama", dict(method="gptq", group_size=32)),
    ("qwen2", dict(method="gptq", bits=8, group_size=32, sym=False, desc_act=True)),
    ("gemma3", dict(method="rtn", group_size=-1)),
    ("llama", dict(method="int8")),
])
def test_quantized_checkpoint_reloads_to_the_same_logits(arch, kw, tiny_model_dir, tmp_path):
    src = tiny_model_dir(arch)
    out = tmp_path / "q"
    summary = quantize(_opts(src, out, lm_head=True, **kw))
    assert summary["quantized_layers"] == 22 and not summary["kept_layers"]      # 21 + lm_head
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["format"] == cfg["checkpoint_format"] == summary["format"]
    assert cfg["format"] == ("gptq" if kw.get("sym", True) else "gptq_v2")
    assert json.loads((out / "quantize_config.json").read_text()) == cfg
    record = json.loads((out / "llmopt.json").read_text())
    assert len(record["layers"]) == 22 and all(r["error"] >= 0 for r in record["layers"])

    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    loaded = load_model(str(out), device="cpu").model
    assert all(type(m).__name__ != "Linear" or m is loaded.get_output_embeddings()
               for n, m in loaded.named_modules() if ".layers." in n)
    logits = _logits(loaded, ids)
    reference = _logits(_dequantized_reference(src, out), ids)
    assert (torch.linalg.norm(logits - reference) / torch.linalg.norm(reference)) < 2e-2

    # a fresh process reads the same checkpoint to exactly the same logits
    script = ("import sys, torch; from llmopt.models import load_model; "
              "m = load_model(sys.argv[1], device='cpu').model; ids = torch.load(sys.argv[2]); "
              "torch.save(m(ids).logits.detach(), sys.argv[3])")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                   check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "l.pt"), logits)


def test_same_seed_gives_byte_identical_checkpoint(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    for name in ("a", "b"):
        quantize(_opts(src, tmp_path / name, desc_act=True, seed=3))
    for f in ("model.safetensors", "config.json", "quantize_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    quantize(_opts(src, tmp_path / "c", desc_act=True, seed=4))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_replaying_the_finished_attention_block_changes_no_byte(arch, tiny_model_dir, tmp_path, monkeypatch):
    from llmopt.quantize import sequential

    src = tiny_model_dir(arch)
    plays = []

    class Counting(sequential._Replay):
        def _player(self, child):
            play = super()._player(child)
            return lambda *a, **k: plays.append(child) or play(*a, **k)

    monkeypatch.setattr(sequential, "_Replay", Counting)
    quantize(_opts(src, tmp_path / "replayed", desc_act=True))
    # the down pass and the final pass of every layer, for every window
    assert plays == ["self_attn"] * (3 * 2 * 8)
    class Never(sequential._Replay):   # records nothing, so every pass recomputes
        def quantized(self, stage):
            pass

    monkeypatch.setattr(sequential, "_Replay", Never)
    quantize(_opts(src, tmp_path / "recomputed", desc_act=True))
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "replayed" / f).read_bytes() == (tmp_path / "recomputed" / f).read_bytes(), f


def test_cli_quantize_info_counts_parameters(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", src, "-o", out, "--calib", "builtin", "--nsamples", "4", "--seq-len", "32",
                            "--skip", "mlp.down_proj", "--no-lm-head", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["quantized_layers"] == 18 and len(summary["kept_layers"]) == 3
    assert summary["quantized_bytes_vs_bf16"] < 0.35
    code, stdout, err = cli("info", out, "--json")
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(src)
    assert json.loads(stdout)["parameters"] == sum(p.numel() for p in original.parameters())
    code, _, err = cli("quantize", src, "-o", out, "--method", "rtn")
    assert code == 2 and "already exists" in err


def test_loads_shuffled_g_idx_with_fp16_scales_assembled_tensor_by_tensor(tiny_model_dir, tmp_path):
    """Classic-format 4-bit, act-order without static groups (shuffled g_idx), fp16 scales, assembled
    here tensor by tensor rather than by llmopt's writer. Checkpoints written by another tool
    (GPTQModel) are checked in tests/test_interop.py."""
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen2")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    out = tmp_path / "other"
    out.mkdir()
    tensors, g = {}, 32
    gen = torch.Generator().manual_seed(0)
    for name, lin in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]:
        k, n = lin.in_features, lin.out_features
        g_idx = (torch.arange(k) // g)[torch.randperm(k, generator=gen)].to(torch.int32)
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        scales = (torch.rand(k // g, n, generator=gen) * 0.02).half()
        zeros = torch.full((k // g, n), 8, dtype=torch.int32)
        words = torch.zeros(k // 8, n, dtype=torch.int64)
        for j in range(k):                              # LSB first, 8 values per word
            words[j // 8] |= q[:, j].long() << (4 * (j % 8))
        zwords = torch.zeros(k // g, n // 8, dtype=torch.int64)
        for c in range(n):
            zwords[:, c // 8] |= (zeros[:, c].long() - 1) << (4 * (c % 8))
        to32 = lambda t: torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32)  # noqa: E731
        tensors.update({f"{name}.qweight": to32(words), f"{name}.qzeros": to32(zwords), f"{name}.scales": scales,
                        f"{name}.g_idx": g_idx})
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.detach().half()
        lin.weight.data = (q.float() - 8) * scales.float().t()[:, g_idx.long()]
    for key, value in model.state_dict().items():
        if "layers" in key and key.endswith((".weight", ".bias")) and key.rsplit(".", 1)[0] + ".qweight" in tensors:
            continue
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        tensors[key] = value.half()
    save_file(tensors, out / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True,
                                  "sym": True}
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    loaded = load_model(str(out), device="cpu").model
    assert {m.mode for m in loaded.modules() if isinstance(m, QuantLinear)} == {"int4"}
    ids = torch.randint(3, 500, (1, 16), generator=gen)
    model = model.half().float()
    a, b = _logits(loaded, ids), _logits(model, ids)
    assert (torch.linalg.norm(a - b) / torch.linalg.norm(b)) < 3e-2


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,match", [
    (["--bits", "5"], "--bits"),
    (["--group-size", "48"], "--group-size"),
    (["--group-size", "0"], "--group-size"),
    (["--nsamples", "0"], "--nsamples"),
    (["--method", "int8", "--bits", "4"], "int8"),
    (["--method", "int8", "--mse"], "full range"),
    (["--seq-len", "1000"], "context"),
])
def test_bad_input_exits_2_and_writes_nothing(args, match, tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    code, _, err = cli("quantize", src, "-o", out, "--calib", "builtin", *args)
    assert code == 2, err
    assert match.lower() in err.lower(), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_short_calibration_file_and_quantized_input_are_refused(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = cli("quantize", src, "-o", tmp_path / "o1", "--calib", short, "--seq-len", "64")
    assert code == 2 and "calibration text" in err and not (tmp_path / "o1").exists()
    quantize(_opts(src, tmp_path / "q", method="rtn"))
    code, _, err = cli("quantize", tmp_path / "q", "-o", tmp_path / "o2", "--method", "rtn")
    assert code == 2 and "already quantized" in err and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- options checked up front

@pytest.mark.parametrize("kw,match", [
    (dict(bits=5), "--bits must be one of 2, 3, 4, 8"),
    (dict(group_size=48), "--group-size must be a positive power of two"),
    (dict(method="int8", bits=4), "--method int8 is 8-bit"),
    (dict(method="int8", group_size=64), "--group-size does not apply"),
    (dict(method="int8", mse=True), "keeps the full range"),
    (dict(nsamples=0), "--nsamples must be positive"),
    (dict(damp=2.0), "--damp must be between 0 and 1"),
    (dict(method="rtn", double_quant=True), "--double-quant only applies to --method nf4/fp4"),
    (dict(skip=["model.layers.(1|2)"]), "--skip 'model.layers.(1|2)' is not a module name pattern"),
    (dict(skip=[" "]), "--skip got an empty pattern"),
])
def test_options_validate_alone_refuses_every_bad_gptq_option(kw, match):
    """No model, no file: validate() is what a recipe's --dry-run runs, so it must hold every check."""
    with pytest.raises(UserError) as e:
        QuantizeOptions(model="not-read", output="not-written", **kw).validate()
    assert match.lower() in str(e.value).lower()


def test_recipe_dry_run_refuses_bits_5_before_any_step_runs(tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {src}\nout: {tmp_path / 'out'}\nsteps:\n  - prune: {{ratio: 0.1}}\n"
                      "  - quantize: {bits: 5}\n")
    code, _, err = cli("run", recipe, "--dry-run")
    assert code == 2 and "--bits must be one of 2, 3, 4, 8" in err, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- --skip: one meaning

@pytest.mark.parametrize("pattern,name,hit", [
    ("model.layers.1", "model.layers.1.mlp.down_proj", True),
    ("model.layers.1", "model.layers.10.mlp.down_proj", False),
    ("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj", True),
    ("*.down_proj", "model.layers.3.mlp.down_proj", True),
    ("*.down_proj", "model.layers.3.mlp.up_proj", False),
    ("model.layers.1[0-9].*", "model.layers.12.self_attn.q_proj", True),
    ("model.layers.1[0-9].*", "model.layers.1.self_attn.q_proj", False),
    ("down_proj", "model.layers.3.mlp.down_proj", True),
    ("mlp.down_proj", "model.layers.3.mlp.down_proj", True),
    ("mlp.gate", "model.layers.3.mlp.gate_proj", False),
    ("layers.1", "model.layers.1.self_attn.o_proj", True),
    ("layers.1", "model.layers.11.self_attn.o_proj", False),
    ("proj", "model.layers.3.mlp.down_proj", False),
    ("layers.1[0-9]", "model.layers.12.mlp.up_proj", True),
    ("layers.1[0-9]", "model.layers.1.mlp.up_proj", False),
])
def test_skip_pattern_matches_dotted_names_not_substrings(pattern, name, hit):
    from llmopt.quantize.options import skip_matches

    assert skip_matches(name, [pattern]) is hit


def test_skip_layer_1_keeps_layer_1_only_not_layers_10_to_19(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", num_hidden_layers=11)
    summary = quantize(_opts(src, tmp_path / "a", method="rtn", skip=["model.layers.1"]))
    assert sorted(summary["kept_layers"]) == sorted(f"model.layers.1.{m}" for m in
                                                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj"))
    summary = quantize(_opts(src, tmp_path / "b", method="rtn", skip=["model.layers.1[0-9].*.down_proj"]))
    assert summary["kept_layers"] == ["model.layers.10.mlp.down_proj"]


@pytest.mark.parametrize("method", ["gptq", "rtn", "int8"])
def test_skip_matching_no_linear_exits_2_and_writes_nothing(method, tiny_model_dir, tmp_path, cli):
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    code, _, err = cli("quantize", src, "-o", out, "--method", method, "--calib", "builtin", "--seq-len", "32",
                         "--skip", "mlp.dwn_proj")
    assert code == 2 and "--skip 'mlp.dwn_proj' matches no Linear layer" in err, err
    assert not out.exists()


def test_help_documents_the_skip_pattern_meaning(cli):
    code, out, _ = cli("quantize", "--help")
    text = " ".join(w for w in out.split() if w != "│")
    assert code == 0 and "dotted prefix" in text and "layers.1[0-9] for layers 10-19" in text


# ----------------------------------------------------------------------------- mixture-of-experts

MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=64),
}


def _tiny_moe(arch: str, directory: Path, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, **MOE_CONFIGS[arch])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("arch", sorted(MOE_CONFIGS))
@pytest.mark.parametrize("method", ["gptq", "rtn", "int8"])
def test_moe_with_fused_experts_is_refused_before_weights_are_read(arch, method, tiny_tokenizer, tmp_path, cli):
    src = _tiny_moe(arch, tmp_path / "moe", tiny_tokenizer)
    (src / "model.safetensors").unlink()          # refused from the config alone: the weights are never read
    out = tmp_path / "out"
    code, _, err = cli("quantize", src, "-o", out, "--method", method, "--calib", "builtin", "--seq-len", "32")
    assert code == 2, err
    assert "mlp.experts.gate_up_proj" in err and "cannot quantize" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- the source's dtype

def test_bf16_source_keeps_bf16_unquantized_tensors_and_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen2")                      # untied head, biased q/k/v
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(src)
    out = tmp_path / "q"
    summary = quantize(_opts(src, out, method="gptq", group_size=32, skip=["mlp.down_proj"], lm_head=False))
    tensors = load_file(out / "model.safetensors")
    plain = {k: t.dtype for k, t in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= set(plain)
    assert set(plain.values()) == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".scales")} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert summary["source_dtype"] == "bfloat16"
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    assert summary["weight_bytes"] == weight_bytes
    assert summary["weight_bytes_vs_float32"] == pytest.approx(weight_bytes / (4 * params), abs=1e-4)
    assert summary["weight_bytes_vs_source"] == pytest.approx(weight_bytes / (2 * params), abs=1e-4)

    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    logits = _logits(load_model(str(out), device="cpu").model, ids)
    reference = _logits(_dequantized_reference(src, out), ids)
    assert (torch.linalg.norm(logits - reference) / torch.linalg.norm(reference)) < 2e-2


# ----------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_4bit_runs_on_the_int4_kernels(smollm2, tmp_path):
    out = tmp_path / "smol"
    summary = quantize(QuantizeOptions(model="smollm2-135m", output=str(out), method="rtn", device="cpu", lm_head=True))
    assert summary["quantized_layers"] == 211 and summary["quantized_bytes_vs_bf16"] < 0.35    # 210 + lm_head
    q = load_model(str(out), device="cpu")
    modes = {m.mode for m in q.model.modules() if isinstance(m, QuantLinear) and m is not q.model.lm_head}
    assert modes == {"int4"} and q.model.lm_head.mode == "int8"      # the head is 8-bit per channel
    assert_close_to_original(q, smollm2)

