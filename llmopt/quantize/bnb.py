"""LLM.int8, NF4 and FP4 through bitsandbytes, applied by transformers' `BitsAndBytesConfig`.

Going through transformers keeps the output in the one layout bitsandbytes users already load:
`AutoModelForCausalLM.from_pretrained(out)` works with bitsandbytes installed and no llmopt.
There is no calibration: each weight is quantized on its own while it is loaded (row-wise int8
for LLM.int8, 64-weight blocks for NF4/FP4), so the work here is choosing what to quantize (the
option checks live in `QuantizeOptions.validate()`, --skip's meaning in `options.skip_matches`),
refusing models it would quantize only in part, and measuring what the rounding cost.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from llmopt.checkpoint import check_output, dir_size, provenance, save_pretrained
from llmopt.errors import MissingExtra, UserError, require
from llmopt.progress import SILENT, Progress
from llmopt.quantize.options import BNB_BITS, QuantizeOptions, check_skip_matches, skip_matches
from llmopt.quantize.sequential import meta_model, refuse_fused_weights

# bitsandbytes' CPU 4-bit kernel repacks each weight in 64-column blocks of 32-row tiles; other shapes
# quantize fine but crash at the first forward pass on CPU.
CPU_4BIT_IN_MULTIPLE, CPU_4BIT_OUT_MULTIPLE = 64, 32

# Loggers that speak on every forward pass (LLM.int8 casting activations to float16, which is how the
# method works) or at import (an optional hub kernel that offline machines cannot fetch).
_CHATTY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops")


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' per-call warnings; they say nothing a user can act on."""
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def require_bitsandbytes(purpose: str = "--method llm-int8/nf4/fp4"):
    """Import bitsandbytes or say exactly how to install it."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingExtra("bitsandbytes", "bnb", purpose) from e
    except Exception as e:  # noqa: BLE001 - a broken native library is the user's to fix, not a crash
        raise UserError(f"bitsandbytes is installed but failed to load: {type(e).__name__}: {e}",
                        hint="reinstall it: pip install --force-reinstall 'llmopt[bnb]'") from e
    return bitsandbytes


def bnb_config(opts: QuantizeOptions, skip_modules: list[str]):
    """The transformers `BitsAndBytesConfig` for these options (also what config.json records)."""
    from transformers import BitsAndBytesConfig

    if opts.method == "llm-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(opts.threshold),
                                  llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.method,
                              bnb_4bit_use_double_quant=bool(opts.double_quant),
                              bnb_4bit_compute_dtype=opts.compute_dtype_name,
                              llm_int8_skip_modules=skip_modules)


def plan_modules(meta_model: torch.nn.Module, skip: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the model's Linear layers into (quantized, kept) by --skip's one meaning (`skip_matches`),
    plus the skip list for `llm_int8_skip_modules`: the output head (kept, like the embeddings) and
    the kept Linears by full name, so transformers' own pattern rules (regex, prefix, suffix) and
    other loaders' agree with it."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    head = meta_model.get_output_embeddings()
    keep = sorted({name for name, m in meta_model.named_modules() if head is not None and m is head})
    linears = [name for name, m in meta_model.named_modules() if type(m) is torch.nn.Linear]
    check_skip_matches(skip, linears)
    skip_all = keep + [n for n in linears if skip_matches(n, skip) and n not in keep]
    quantized = [n for n in linears if should_convert_module(n, skip_all)]
    kept = [n for n in linears if n not in quantized]
    return quantized, kept, skip_all


def check_cpu_shapes(meta_model: torch.nn.Module, quantized: list[str]) -> None:
    """Refuse 4-bit layers that bitsandbytes' CPU kernel cannot run, before spending any time on them."""
    modules = dict(meta_model.named_modules())
    bad = [n for n in quantized if modules[n].in_features % CPU_4BIT_IN_MULTIPLE
           or modules[n].out_features % CPU_4BIT_OUT_MULTIPLE]
    if bad:
        shown = ", ".join(f"{n} ({modules[n].in_features}->{modules[n].out_features})" for n in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"bitsandbytes' CPU 4-bit kernel needs input widths divisible by {CPU_4BIT_IN_MULTIPLE} "
                        f"and output widths by {CPU_4BIT_OUT_MULTIPLE}; {shown}{more} are not",
                        hint="keep them in full precision with --skip NAME, use --method llm-int8, or quantize "
                             "on CUDA with --device cuda")


def _source_dir(opts: QuantizeOptions, progress: Progress, workdir: Path) -> tuple[str, dict]:
    """A from_pretrained-able location of the full-precision model, and its config as a dict."""
    from llmopt.models import check_causal, load_model, local_dir, quant_method, read_config

    source = local_dir(opts.model, progress)
    if source.kind == "hub":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.hub_id).to_dict()
        except (OSError, ValueError) as e:
            raise UserError(f"could not fetch '{source.hub_id}' from the Hugging Face hub",
                            hint="check the id and your network, or pass a local directory") from e
        where = source.hub_id
    elif source.kind == "gguf":
        # bitsandbytes quantizes while loading a standard checkpoint: dequantize the GGUF into one first.
        loaded = load_model(opts.model, device="cpu", dtype="float32", progress=progress)
        where = str(workdir / "source")
        loaded.model.save_pretrained(where)
        loaded.tokenizer.save_pretrained(where)
        del loaded
        config = read_config(Path(where))
    else:
        where = str(source.path)
        config = read_config(source.path)
    check_causal(config, opts.model)
    method = quant_method(config)
    if method is not None:
        raise UserError(f"{opts.model} is already quantized ({method})",
                        hint="quantize from the full-precision model")
    return where, config


def _weight_files(where: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local checkpoint (empty for hub ids)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in sorted(Path(where).glob("*.safetensors")) if Path(where).is_dir() else []:
        with safe_open(f, "pt") as st:
            index.update({k: f for k in st.keys()})
    return index


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The float32 weight a bitsandbytes layer computes with (None for other layers)."""
    import bitsandbytes.functional as F

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        return F.dequantize_4bit(weight.data, state).float()
    if weight is not None and weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        if scb is None and getattr(module, "state", None) is not None:
            scb = module.state.SCB
        if scb is not None:
            return weight.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return None


@torch.no_grad()
def weight_errors(model: torch.nn.Module, where: str, quantized: list[str]) -> dict:
    """Relative Frobenius error ||W_q - W|| / ||W|| of each quantized weight against the source file."""
    from safetensors import safe_open

    files = _weight_files(where)
    modules = dict(model.named_modules())
    errors: dict[str, float] = {}
    for name in quantized:
        key = f"{name}.weight"
        if key not in files or name not in modules:
            continue
        deq = dequantized_weight(modules[name])
        if deq is None:
            continue
        with safe_open(files[key], "pt") as st:
            ref = st.get_tensor(key).float()
        if ref.shape != deq.shape:
            continue
        errors[name] = ((deq.cpu() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if not errors:
        return {}
    values = list(errors.values())
    worst = max(errors, key=errors.get)
    return {"weight_rel_error_mean": round(sum(values) / len(values), 6),
            "weight_rel_error_max": round(errors[worst], 6), "weight_rel_error_worst_layer": worst,
            "weight_rel_error_layers": len(values)}


def store_unquantized_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast what bitsandbytes left unquantized (embeddings, norms, head, kept Linears, biases) to the
    source's dtype before saving: computed in float32, a bfloat16 original would double in size."""
    for p in model.parameters():      # bitsandbytes' own Params4bit / Int8Params are subclasses: left alone
        if type(p) is torch.nn.Parameter and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.config.dtype = dtype


def quantize_bnb(opts: QuantizeOptions, progress: Progress = SILENT) -> dict:
    """`llmopt quantize --method llm-int8|nf4|fp4`: quantize while loading, save in transformers' layout."""
    from llmopt.info import count_parameters, weight_bytes
    from llmopt.models import from_pretrained_checked, parse_device, parse_dtype, source_dtype

    started = time.time()
    device = parse_device(opts.device)
    dtype = parse_dtype(opts.dtype, device)
    out = check_output(opts.output, opts.force)
    require_bitsandbytes()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=f".{out.name}.src-", dir=out.absolute().parent) as work:
        where, _ = _source_dir(opts, progress, Path(work))
        meta = meta_model(where)
        refuse_fused_weights(meta, opts.method)
        quantized, kept, skip_all = plan_modules(meta, opts.skip)
        require(bool(quantized), "no Linear layer is left to quantize", "match fewer layers with --skip")
        if BNB_BITS[opts.method] == 4 and device.type == "cpu":
            check_cpu_shapes(meta, quantized)
        del meta
        config = bnb_config(opts, skip_all)
        progress.start(f"Quantizing {opts.model} with bitsandbytes {opts.method} ({len(quantized)} layers)",
                       total=None)
        placement = {"": "cpu"} if device.type == "cpu" else {"": device.index or 0}
        model = from_pretrained_checked(where, opts.model, quantization_config=config, dtype=dtype,
                                        device_map=placement).eval()
        tokenizer = AutoTokenizer.from_pretrained(where)
        progress.finish()
        progress.start("Measuring weight error against the source", total=None)
        errors = weight_errors(model, where, quantized)
        progress.finish()
        stored = source_dtype(Path(where), dtype)

    params = count_parameters(model)
    mem = weight_bytes(model)
    metrics = {
        "quantized_layers": len(quantized),
        "kept_layers": kept,
        "parameters": params,
        "weight_bytes": mem,
        "bits_per_weight": round(8 * mem / params, 3) if params else None,
        **errors,
    }
    settings = {"method": opts.method, "bits": BNB_BITS[opts.method], "skip_modules": skip_all,
                "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                "source_dtype": str(stored).replace("torch.", "")}
    if opts.method == "llm-int8":
        settings["threshold"] = float(opts.threshold)
    else:
        settings.update(double_quant=bool(opts.double_quant),
                        compute_dtype=opts.compute_dtype_name)
    record = provenance("quantize", opts.model, opts, started, metrics=metrics, quantization=settings)
    progress.start(f"Writing {out}", total=None)
    store_unquantized_in(model, stored)
    save_pretrained(model, tokenizer, out, opts.force, record)
    progress.finish()
    return {"output": str(out), **settings, **metrics, "disk_bytes": dir_size(out),
            "wall_time_s": round(time.time() - started, 3)}
