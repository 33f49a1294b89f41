"""`llmopt quantize --method gptq|rtn|int8`: validate, calibrate, quantize layer by layer, write the
standard GPTQ checkpoint (see docs/formats.md) and report per-layer errors.

- gptq: the GPTQ solver on calibration data (`gptq.py`), any of 2/3/4/8 bits.
- rtn:  round-to-nearest on the same grid and layout, no calibration (the baseline GPTQ must beat).
- int8: 8-bit symmetric round-to-nearest with one scale per output channel, the one layout PyTorch's
        `_weight_int8pack_mm` kernel runs directly; no calibration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmopt.checkpoint import atomic_output, check_output, dir_size, provenance, write_provenance
from llmopt.errors import UserError, require
from llmopt.models import check_causal, local_dir, parse_device, parse_dtype, quant_method, read_config
from llmopt.progress import SILENT, Progress
from llmopt.quantize import packing
from llmopt.quantize.gptq import LayerResult, QuantSpec, gptq_quantize, rtn_quantize
from llmopt.quantize.options import QuantizeOptions
from llmopt.quantize.sequential import decoder_layers, quantize_layers, skipped

SHARD_BYTES = 4 * 1024 ** 3


def resolved_bits(opts: QuantizeOptions) -> int:
    return opts.bits if opts.bits is not None else (8 if opts.method == "int8" else 4)


def validate(opts: QuantizeOptions) -> None:
    """The GPTQ-layout methods' own checks (QuantizeOptions.validate ran already)."""
    bits = resolved_bits(opts)
    require(bits in packing.BITS, f"--bits must be one of 2, 3, 4, 8 for --method {opts.method}, got {bits}")
    g = opts.group_size
    require(g == -1 or (g > 0 and g & (g - 1) == 0),
            f"--group-size must be a positive power of two or -1 (per channel), got {g}")
    if opts.method == "int8":
        require(bits == 8, f"--method int8 is 8-bit, got --bits {bits}", "use --method gptq or rtn for other widths")
        require(opts.group_size in (-1, QuantizeOptions.group_size),
                "--method int8 has one scale per output channel; --group-size does not apply",
                "drop --group-size, or use --method gptq/rtn --bits 8 --group-size N")
        require(opts.sym, "--method int8 is symmetric", "use --method gptq/rtn --bits 8 --asym")
        require(opts.mse is not True, "--method int8 keeps the full range", "use --method gptq/rtn --bits 8 --mse")
    require(opts.nsamples > 0, f"--nsamples must be positive, got {opts.nsamples}")
    require(opts.seq_len > 0, f"--seq-len must be positive, got {opts.seq_len}")
    require(0 <= opts.damp <= 1, f"--damp must be between 0 and 1, got {opts.damp}")
    require(opts.block_size > 0, f"--block-size must be positive, got {opts.block_size}")
    require(not opts.double_quant, "--double-quant is for --method nf4/fp4")
    for pattern in opts.skip:
        require(bool(pattern.strip()), "--skip got an empty pattern")


def _spec(opts: QuantizeOptions) -> QuantSpec:
    if opts.method == "int8":
        return QuantSpec(8, -1, True)
    mse = opts.method == "gptq" if opts.mse is None else opts.mse
    return QuantSpec(resolved_bits(opts), opts.group_size, opts.sym, mse)


def _calibration(opts: QuantizeOptions, path: Path) -> tuple[torch.Tensor, str]:
    from transformers import AutoTokenizer

    from llmopt.data import text_windows

    tok = AutoTokenizer.from_pretrained(path)
    return text_windows(tok, opts.calib, "calib", opts.seq_len, nsamples=opts.nsamples, seed=opts.seed,
                        directory=opts.data_dir)


def quantization_config(opts: QuantizeOptions, spec: QuantSpec, fmt: str, skipped_modules: list[str]) -> dict:
    from llmopt import __version__

    config = {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size,
        "desc_act": bool(opts.desc_act and opts.method == "gptq"),
        "static_groups": bool(opts.desc_act and opts.method == "gptq"),
        "sym": spec.sym,
        "damp_percent": opts.damp,
        "true_sequential": opts.true_sequential,
        "lm_head": False,
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmopt:{__version__}"], "method": opts.method, "mse": spec.mse},
    }
    if skipped_modules:   # GPTQModel's per-module override: "-:" excludes matching modules
        config["dynamic"] = {f"-:^{name.replace('.', '[.]')}$": {} for name in skipped_modules}
    return config


def _state_dict(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Model tensors with each quantized Linear's weight replaced by its packed tensors; tied
    tensors written once (under the first name, as transformers does)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in packed and leaf == "weight":
            for key, value in packed[module].items():
                out[f"{module}.{key}"] = value.contiguous()
            continue
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().cpu().contiguous()
    return out


def save_safetensors(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """model.safetensors, or shards of at most SHARD_BYTES with the standard index."""
    from safetensors.torch import save_file

    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= SHARD_BYTES:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _layer_rows(done) -> list[dict]:
    return [{"module": q.name, "layer": q.layer, "error": q.result.error, "damp": q.result.damp,
             "seconds": round(q.seconds, 4)} for q in done]


def quantize_gptq(opts: QuantizeOptions, progress: Progress = SILENT) -> dict:
    """Quantize opts.model into opts.output in the standard GPTQ layout; returns the summary."""
    started = time.time()
    validate(opts)
    out = check_output(opts.output, opts.force)
    device = parse_device(opts.device)
    dtype = parse_dtype(opts.dtype, device)
    source = local_dir(opts.model, progress)
    if source.kind == "hub":
        raise UserError("llmopt quantize reads local models", hint="download the model first or pass an alias")
    if source.kind in ("dir", "alias"):
        config = read_config(source.path)
    if source.kind == "dir":
        check_causal(config, opts.model)
        method = quant_method(config)
        require(method is None, f"{opts.model} is already quantized ({method})",
                "quantize the original full-precision model")
    if source.kind in ("dir", "alias") and opts.method == "gptq":
        context = (config.get("text_config") or config).get("max_position_embeddings")
        require(context is None or opts.seq_len <= context,
                f"--seq-len {opts.seq_len} is longer than the model's context of {context} tokens",
                f"calibrate with --seq-len {context} or less")
    spec = _spec(opts)
    windows, calib_desc = None, None
    calib_s = 0.0
    if opts.method == "gptq":
        t = time.time()
        if source.kind == "gguf":
            raise UserError("GPTQ calibration needs a model directory, not a .gguf file",
                            hint="convert it first, or use --method rtn")
        windows, calib_desc = _calibration(opts, source.path)
        calib_s = time.time() - t

    from llmopt.models import load_model

    loaded = load_model(opts.model, device="cpu", dtype=str(dtype).replace("torch.", ""), progress=progress)
    model = loaded.model
    prefix, layers = decoder_layers(model)

    # layers the standard layout cannot hold (widths that do not fill whole int32 words)
    skip = list(opts.skip)
    unpackable = []
    for i, layer in enumerate(layers):
        for n, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear) and not skipped(f"{prefix}.{i}.{n}", skip) and (
                    m.in_features % 32 or not packing.packable(m.out_features, spec.bits)):
                unpackable.append(f"{prefix}.{i}.{n}")
    if unpackable:
        progress.note(f"{len(unpackable)} Linear layers have widths the GPTQ layout cannot pack; kept in "
                      f"full precision: {', '.join(unpackable[:3])}{' ...' if len(unpackable) > 3 else ''}")
    skip_names = skip + unpackable

    def solve(name: str, linear: torch.nn.Linear, h: torch.Tensor | None) -> LayerResult:
        if opts.method == "gptq":
            return gptq_quantize(linear.weight.data, h, spec, damp=opts.damp, block_size=opts.block_size,
                                 desc_act=opts.desc_act, note=lambda m: progress.note(f"{name}: {m}"))
        return rtn_quantize(linear.weight.data, spec)

    t = time.time()
    done = quantize_layers(model, solve, windows=windows, device=device, skip=skip_names,
                           true_sequential=opts.true_sequential, progress=progress)
    quant_s = time.time() - t
    require(bool(done), "no Linear layer was quantized", "check --skip patterns")

    fmt = "gptq" if spec.sym else "gptq_v2"
    packed = {q.name: packing.pack_layer(q.result.q, q.result.scales, q.result.zeros, q.result.g_idx,
                                         spec.bits, fmt) for q in done}
    quantized_names = {q.name for q in done}
    all_linear = [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers)
                  for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    kept = [n for n in all_linear if n not in quantized_names]
    qconfig = quantization_config(opts, spec, fmt, kept)

    rows = _layer_rows(done)
    errors = [r["error"] for r in rows]
    params_q = sum(layers.get_submodule(q.name[len(prefix) + 1:]).weight.numel() for q in done)
    bytes_q = sum(sum(t.numel() * t.element_size() for t in p.values()) for p in packed.values())
    metrics = {
        "quantized_layers": len(done),
        "kept_layers": kept,
        "mean_error": sum(errors) / len(errors),
        "max_error": max(errors),
        "error_metric": "relative output error on calibration inputs" if opts.method == "gptq"
        else "relative weight error",
        "quantized_bytes": bytes_q,
        "quantized_bytes_vs_bf16": round(bytes_q / (2 * params_q), 4),
        "calibration": calib_desc,
        "calibration_tokens": int(windows.numel()) if windows is not None else 0,
        "calibration_s": round(calib_s, 2),
        "quantize_s": round(quant_s, 2),
    }

    with atomic_output(out, opts.force) as tmp:
        save_safetensors(_state_dict(model, packed), tmp)
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        record = provenance("quantize", opts.model, opts, started, metrics=metrics,
                            quantization=qconfig, layers=rows)
        write_provenance(tmp, record)

    summary = {
        "output": str(out),
        "method": opts.method,
        "bits": spec.bits,
        "group_size": spec.group_size,
        "sym": spec.sym,
        "desc_act": qconfig["desc_act"],
        "format": fmt,
        "disk_bytes": dir_size(out),
        "wall_time_s": round(time.time() - started, 2),
        **metrics,
        "layers": rows,
    }
    return summary
