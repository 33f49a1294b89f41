"""`llmopt quantize --method gptq|rtn|int8`: validate, calibrate, quantize layer by layer, write the
standard GPTQ checkpoint (see docs/formats.md) and report per-layer errors.

- gptq: the GPTQ solver on calibration data (`gptq.py`), any of 2/3/4/8 bits.
- rtn:  round-to-nearest on the same grid and layout, no calibration (the baseline GPTQ must beat).
- int8: 8-bit symmetric round-to-nearest with one scale per output channel, the one layout PyTorch's
        `_weight_int8pack_mm` kernel runs directly; no calibration.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmopt.checkpoint import atomic_output, check_output, dir_size, provenance, write_provenance
from llmopt.errors import UserError, require
from llmopt.models import Source, check_causal, local_dir, parse_device, parse_dtype, quant_method, read_config, \
    source_dtype
from llmopt.progress import SILENT, Progress
from llmopt.quantize import packing
from llmopt.quantize.gptq import LayerResult, QuantSpec, gptq_quantize, rtn_quantize
from llmopt.quantize.options import QuantizeOptions, check_skip_matches, skip_matches
from llmopt.quantize.sequential import (decoder_layers, final_norm, meta_model, quantize_layers,
                                        refuse_fused_weights)

SHARD_BYTES = 4 * 1024 ** 3


def _spec(opts: QuantizeOptions) -> QuantSpec:
    if opts.method == "int8":
        return QuantSpec(8, -1, True)
    mse = opts.method == "gptq" if opts.mse is None else opts.mse
    return QuantSpec(opts.resolved_bits, opts.group_size, opts.sym, mse)


def head_spec(spec: QuantSpec) -> QuantSpec:
    """The output head's grid: 8-bit with one scale per output channel below 8 bits, else the decoder's.
    On SmolLM2 (GPTQ 4-bit g128) a 4-bit head with embeddings read from it raised WikiText-2
    perplexity from 30.5 to 33.8; the 8-bit head left it at 30.5 and still decoded 2.0x float32."""
    return spec if spec.bits == 8 else QuantSpec(8, -1, True, spec.mse)


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _head_name(model: torch.nn.Module) -> str | None:
    """The dotted name of the output head, when it is a plain Linear."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None) if isinstance(head, torch.nn.Linear) \
        else None


def head_plan(model: torch.nn.Module, opts: QuantizeOptions) -> str | None:
    """The output head's name when --lm-head asks for it; a head the layout cannot hold (or GPTQ
    cannot calibrate) is refused."""
    if not opts.lm_head:
        return None
    name = _head_name(model)
    head = model.get_submodule(name) if name else None
    why = None
    if head is None:
        why = "this model's output head is not a Linear layer"
    elif head.in_features % 32 or not packing.packable(head.out_features, head_spec(_spec(opts)).bits):
        why = f"the output head's widths ({head.out_features} x {head.in_features}) do not fill whole int32 words"
    elif opts.method == "gptq" and final_norm(model) is None:
        why = "no final norm was found beside the decoder layers to calibrate the head on"
    require(why is None, f"--lm-head: {why}", "drop --lm-head")
    return name


def _tied(model: torch.nn.Module, head: str | None) -> bool:
    emb = model.get_input_embeddings()
    return head is not None and model.get_submodule(head).weight is getattr(emb, "weight", None)


def _check_model(model: torch.nn.Module, opts: QuantizeOptions) -> None:
    """The option checks that need the model's module tree (a meta model is enough)."""
    refuse_fused_weights(model, opts.method)
    check_skip_matches(opts.skip, _linear_names(model))
    head_plan(model, opts)


def _check_source(opts: QuantizeOptions, progress: Progress) -> Source:
    """Everything that can be refused from the source's config, before any weights are read."""
    source = local_dir(opts.model, progress)
    if source.kind == "hub":
        raise UserError("llmopt quantize reads local models", hint="download the model first or pass an alias")
    if source.kind == "gguf":
        require(opts.method != "gptq", "GPTQ calibration needs a model directory, not a .gguf file",
                "convert it first, or use --method rtn")
        return source     # no config before loading: checked on the loaded model
    config = read_config(source.path)
    if source.kind == "dir":
        check_causal(config, opts.model)
        method = quant_method(config)
        require(method is None, f"{opts.model} is already quantized ({method})",
                "quantize the original full-precision model")
    if opts.method == "gptq":
        context = (config.get("text_config") or config).get("max_position_embeddings")
        require(context is None or opts.seq_len <= context,
                f"--seq-len {opts.seq_len} is longer than the model's context of {context} tokens",
                f"calibrate with --seq-len {context} or less")
    _check_model(meta_model(str(source.path)), opts)
    return source


def _calibration(opts: QuantizeOptions, path: Path) -> tuple[torch.Tensor, str]:
    from transformers import AutoTokenizer

    from llmopt.data import text_windows

    tok = AutoTokenizer.from_pretrained(path)
    return text_windows(tok, opts.calib, "calib", opts.seq_len, nsamples=opts.nsamples, seed=opts.seed,
                        directory=opts.data_dir)


def quantization_config(opts: QuantizeOptions, spec: QuantSpec, fmt: str, skipped_modules: list[str],
                        head: str | None = None, tied: bool = False,
                        in_block: list[list[str]] | None = None) -> dict:
    """GPTQModel's keys; a head on another grid gets a positive `dynamic` override (GPTQModel's own
    convention for its lm_head); `meta.tied_embeddings` says the written embeddings were the head's own
    weight (the config is untied so that loaders keep them apart; llmopt's runtime serves them from it).
    `in_block` (see `modules_in_block`) is written when decoder Linears are kept in full precision."""
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
        "lm_head": head is not None,
        "format": fmt,
        "checkpoint_format": fmt,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"llmopt:{__version__}"], "method": opts.method, "mse": spec.mse},
    }
    if head is not None and tied:
        config["meta"]["tied_embeddings"] = True
    dynamic = {}
    hs = head_spec(spec)
    if head is not None and hs != spec:   # "+:" overrides the matching module's keys
        dynamic[f"+:^{head.replace('.', '[.]')}$"] = {"bits": hs.bits, "group_size": hs.group_size, "sym": hs.sym,
                                                      "desc_act": False}
    # "-:" excludes matching modules
    dynamic.update({f"-:^{name.replace('.', '[.]')}$": {} for name in skipped_modules})
    if dynamic:
        config["dynamic"] = dynamic
    if skipped_modules and in_block:
        config["modules_in_block_to_quantize"] = in_block
    return config


def modules_in_block(prefix: str, quantized: list[str]) -> list[list[str]]:
    """`modules_in_block_to_quantize`, the key transformers' GPTQ loading (through optimum) reads to leave
    Linears of the decoder blocks unquantized: it keeps a Linear when its full name ends with a listed
    name. Names inside a block ("self_attn.q_proj") when every block quantizes the same ones, else the
    full names of the quantized Linears, which match nothing else."""
    rel = [n[len(prefix) + 1:] for n in quantized if n.startswith(prefix + ".")]
    blocks: dict[str, list[str]] = {}
    for name in rel:
        index, _, inner = name.partition(".")
        blocks.setdefault(index, []).append(inner)
    sets = {tuple(sorted(v)) for v in blocks.values()}
    if len(sets) == 1:
        return [list(dict.fromkeys(next(iter(blocks.values()))))]
    return [[f"{prefix}.{n}" for n in rel]]


def _state_dict(model: torch.nn.Module, packed: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    """Model tensors with each quantized Linear's weight replaced by its packed tensors (which keep the
    layout's own dtypes) and every other floating tensor in `dtype`, the source's; tied tensors
    written once (under the first name, as transformers does)."""
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
        tensor = tensor.detach().cpu()
        out[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
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


def _unpackable(layers: torch.nn.ModuleList, prefix: str, spec: QuantSpec, skip: list[str],
                progress: Progress) -> list[str]:
    """Decoder Linears the standard layout cannot hold (widths that do not fill whole int32 words)."""
    names = [f"{prefix}.{i}.{n}" for i, layer in enumerate(layers) for n, m in layer.named_modules()
             if isinstance(m, torch.nn.Linear) and not skip_matches(f"{prefix}.{i}.{n}", skip)
             and (m.in_features % 32 or not packing.packable(m.out_features, spec.bits))]
    if names:
        progress.note(f"{len(names)} Linear layers have widths the GPTQ layout cannot pack; kept in "
                      f"full precision: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}")
    return names


def fit_group_size(requested: int, widths: dict[str, int]) -> tuple[int, str | None]:
    """The group size written and, when it is not `requested`, the Linear that forced it.

    transformers, GPTQModel and vLLM refuse a Linear whose input width is not a multiple of the group
    size (a partial last group), so the group size is halved until it divides every quantized input
    width (`widths`: module name -> in_features). Packable widths are multiples of 32, so this stops
    at 32 at the latest, a size every GPTQ kernel accepts; -1 (per channel) always fits."""
    group = requested
    while group > 1 and any(w % group for w in widths.values()):
        group //= 2
    if group == requested:
        return group, None
    return group, min(widths, key=lambda n: widths[n] & -widths[n])     # the fewest factors of two


def _loader_note(head: str | None, progress: Progress) -> None:
    """What transformers' from_pretrained cannot read (measured with transformers 5.24 and GPTQModel
    7.7.0: benchmarks/interop_gptqmodel.py): a quantized output head; GPTQModel and llmopt read it.
    (Kept decoder Linears it reads, through `modules_in_block_to_quantize`.)"""
    if head:
        progress.note("the quantized output head: this checkpoint loads in llmopt and GPTQModel, not in "
                      "transformers' from_pretrained (it does not read a quantized head)")


INT4_CPU_GROUPS = (32, 64, 128, 256)      # torch's _weight_int4pack_mm_cpu: GPTQModel's default 4-bit CPU kernel


def _refuse_int4_per_channel(spec: QuantSpec, widths: dict[str, int]) -> None:
    """GPTQModel's default CPU kernel, which transformers loads through too, runs a 4-bit per-channel
    layer as one group of its input width and refuses widths other than INT4_CPU_GROUPS (measured with
    GPTQModel 7.7.0: benchmarks/interop_gptqmodel.py)."""
    if spec.bits != 4 or spec.group_size != -1:
        return
    odd = next((n for n, w in widths.items() if w not in INT4_CPU_GROUPS), None)
    require(odd is None, f"4-bit per channel (--group-size -1): {odd} has input width {widths.get(odd)}, and "
            f"GPTQModel's default CPU kernel (transformers' too) takes only 32, 64, 128 or 256 there",
            "use --group-size 128 (fitted to the widths), or --bits 8")


def _fit_spec(spec: QuantSpec, model: torch.nn.Module, skip: list[str], head: str | None,
              progress: Progress) -> QuantSpec:
    """`spec` with the group size that divides the input width of every Linear quantized on the
    decoder's grid (the decoder Linears not in `skip`, and an 8-bit head); says so in one note when
    it had to change."""
    prefix, layers = decoder_layers(model)
    names = [f"{prefix}.{n}" for n in _linear_names(layers) if not skip_matches(f"{prefix}.{n}", skip)]
    if head is not None and head_spec(spec) == spec:
        names.append(head)
    widths = {n: model.get_submodule(n).in_features for n in names}
    _refuse_int4_per_channel(spec, widths)
    group, culprit = fit_group_size(spec.group_size, widths)
    if culprit is None:
        return spec
    progress.note(f"group size {group}, not {spec.group_size}: {culprit} has input width {widths[culprit]}, and "
                  f"transformers, GPTQModel and vLLM refuse a layer whose input width is not a multiple of the "
                  f"group size")
    return dataclasses.replace(spec, group_size=group)


def _error_metrics(opts: QuantizeOptions, rows: list[dict]) -> dict:
    errors = [r["error"] for r in rows]
    return {"mean_error": sum(errors) / len(errors), "max_error": max(errors),
            "error_metric": "relative output error on calibration inputs" if opts.method == "gptq"
            else "relative weight error"}


def _packed_metrics(model: torch.nn.Module, done, packed: dict) -> dict:
    """The quantized layers alone: their packed bytes, and those over 2 bytes per weight they replace."""
    params_q = sum(model.get_submodule(q.name).weight.numel() for q in done)
    bytes_q = sum(sum(t.numel() * t.element_size() for t in p.values()) for p in packed.values())
    return {"quantized_bytes": bytes_q, "quantized_bytes_vs_bf16": round(bytes_q / (2 * params_q), 4)}


def _size_metrics(tensors: dict[str, torch.Tensor], params: int, dtype: torch.dtype) -> dict:
    """Bytes of every tensor written, against the source model at float32 and in its own dtype."""
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    own = torch.empty((), dtype=dtype).element_size()
    return {"source_dtype": str(dtype).replace("torch.", ""), "weight_bytes": written,
            "weight_bytes_vs_float32": round(written / (4 * params), 4),
            "weight_bytes_vs_source": round(written / (own * params), 4)}


def _solver(opts: QuantizeOptions, spec: QuantSpec, head: str | None, progress: Progress
            ) -> Callable[[str, torch.nn.Linear, torch.Tensor | None], LayerResult]:
    """How one Linear is quantized (GPTQ from its Hessian, or round-to-nearest); the head gets head_spec."""

    def solve(name: str, linear: torch.nn.Linear, h: torch.Tensor | None) -> LayerResult:
        s = head_spec(spec) if name == head else spec
        if opts.method == "gptq":
            return gptq_quantize(linear.weight.data, h, s, damp=opts.damp, block_size=opts.block_size,
                                 desc_act=opts.desc_act, note=lambda m: progress.note(f"{name}: {m}"))
        return rtn_quantize(linear.weight.data, s)

    return solve


def quantize_gptq(opts: QuantizeOptions, progress: Progress = SILENT) -> dict:
    """Quantize opts.model into opts.output in the standard GPTQ layout; returns the summary.
    `opts.validate()` ran already (in `llmopt.quantize.quantize`)."""
    started = time.time()
    out = check_output(opts.output, opts.force)
    device = parse_device(opts.device)
    dtype = parse_dtype(opts.dtype, device)
    source = _check_source(opts, progress)
    spec = _spec(opts)
    windows, calib_desc, calib_s = None, None, 0.0
    if opts.method == "gptq":
        t = time.time()
        windows, calib_desc = _calibration(opts, source.path)
        calib_s = time.time() - t

    from llmopt.models import load_model

    loaded = load_model(opts.model, device="cpu", dtype=str(dtype).replace("torch.", ""), progress=progress)
    model = loaded.model
    if source.kind == "gguf":
        _check_model(model, opts)
    out_dtype = source_dtype(source.path, dtype)
    params = sum(p.numel() for p in model.parameters())
    prefix, layers = decoder_layers(model)
    skip_names = list(opts.skip) + _unpackable(layers, prefix, spec, opts.skip, progress)
    head = head_plan(model, opts)
    tied = _tied(model, head)
    spec = _fit_spec(spec, model, skip_names, head, progress)

    t = time.time()
    done = quantize_layers(model, _solver(opts, spec, head, progress), windows=windows, device=device, skip=skip_names,
                           true_sequential=opts.true_sequential, head=head, progress=progress)
    quant_s = time.time() - t
    require(bool(done), "no Linear layer was quantized", "check --skip patterns")

    fmt = "gptq" if spec.sym else "gptq_v2"
    packed = {q.name: packing.pack_layer(q.result.q, q.result.scales, q.result.zeros, q.result.g_idx,
                                         head_spec(spec).bits if q.name == head else spec.bits, fmt) for q in done}
    quantized_names = {q.name for q in done}
    kept = [f"{prefix}.{n}" for n in _linear_names(layers) if f"{prefix}.{n}" not in quantized_names]
    in_block = modules_in_block(prefix, [f"{prefix}.{n}" for n in _linear_names(layers)
                                         if f"{prefix}.{n}" in quantized_names])
    qconfig = quantization_config(opts, spec, fmt, kept, head=head, tied=tied, in_block=in_block)
    _loader_note(head, progress)
    tensors = _state_dict(model, packed, out_dtype)

    rows = _layer_rows(done)
    metrics = {"quantized_layers": len(done), "kept_layers": kept, "group_size_requested": _spec(opts).group_size,
               **_error_metrics(opts, rows), **_packed_metrics(model, done, packed),
               **_size_metrics(tensors, params, out_dtype),
               "calibration": calib_desc,
               "calibration_tokens": int(windows.numel()) if windows is not None else 0,
               "calibration_s": round(calib_s, 2), "quantize_s": round(quant_s, 2)}
    record = provenance("quantize", opts.model, opts, started, metrics=metrics, quantization=qconfig, layers=rows)
    _write(out, opts, loaded, tensors, qconfig, out_dtype, record)
    return {"output": str(out), "method": opts.method, "bits": spec.bits, "group_size": spec.group_size,
            "sym": spec.sym, "desc_act": qconfig["desc_act"], "format": fmt, "disk_bytes": dir_size(out),
            "wall_time_s": round(time.time() - started, 2), **metrics, "layers": rows}


def _write(out: Path, opts: QuantizeOptions, loaded, tensors: dict[str, torch.Tensor], qconfig: dict,
           dtype: torch.dtype, record: dict) -> None:
    """The checkpoint, atomically: weights, config (with quantization_config and the written dtype),
    quantize_config.json, generation config, tokenizer, llmopt.json."""
    model = loaded.model
    with atomic_output(out, opts.force) as tmp:
        save_safetensors(tensors, tmp)
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qconfig
        if qconfig["meta"].get("tied_embeddings"):   # the file holds both: loaders must not re-tie them
            for c in (cfg, cfg.get("text_config")):
                if isinstance(c, dict):
                    c["tie_word_embeddings"] = False
        cfg["dtype"] = str(dtype).replace("torch.", "")
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        write_provenance(tmp, record)
