"""Structured width pruning that ships as a standard checkpoint.

`prune(opts)` removes query heads, whole KV groups and MLP channels from every decoder layer so that
`--ratio` of the model's total parameters are gone, then writes a checkpoint whose config is the
model's own type with smaller `num_attention_heads` / `num_key_value_heads` / `intermediate_size`,
so plain `transformers.AutoModelForCausalLM.from_pretrained` loads it.

Steps: plan the widths from the config alone (fails fast on a ratio that cannot be met), load,
score every structure on calibration text (`importance`: Taylor gradients times the error the
least-squares refit leaves, by default), pick the attention/MLP split (`--split
auto` tries every attention shape that fits the budget and keeps the one with the lowest calibration
loss), remove the lowest-scored structures per layer and refit the kept output projections by least
squares (`slicing`), measure, write.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmopt.checkpoint import check_output, provenance, save_pretrained
from llmopt.data import check_source, resolve_auto, text_windows
from llmopt.errors import UserError, require
from llmopt.info import count_parameters, embedding_parameters
from llmopt.models import load_model, local_dir, parse_device, parse_dtype, quant_method, read_config, resolve
from llmopt.progress import SILENT, Progress
from llmopt.prune import importance as imp
from llmopt.prune import slicing
from llmopt.prune.structure import Candidate, Geometry, Widths, arch_for, candidates, geometry, max_removable, \
    text_config

MAX_RATIO = 0.9
SPLITS = "auto, mlp or a fraction in [0, 1]"
SELECTION_WINDOWS = 8   # held-out calibration windows that compare attention/MLP splits and report the loss


@dataclass
class PruneOptions:
    model: str
    output: str
    ratio: float = 0.2                 # fraction of the model's TOTAL parameters to remove
    importance: str = "taylor-obs"     # taylor-obs | taylor | taylor2 | obs | l2 | random
    calib: str = "auto"                # auto = wikitext2 when a data dir is set, else builtin
    nsamples: int = 64                 # more windows, better scores and refit (docs/prune.md: 32 -> 64 measured)
    seq_len: int = 512
    seed: int = 0
    layers: str = "all"                # which layers lose structures; a standard config needs all of them
    multiple_of: int = 8               # the kept MLP width is a multiple of this
    split: str = "auto"                # auto | mlp | share of the removed parameters taken from attention
    reconstruct: bool = True           # least-squares refit of o_proj / down_proj on calibration data
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False

    def validate(self) -> None:
        require(bool(self.output), "no output directory given", "pass -o OUT")
        require(0 < self.ratio <= MAX_RATIO, f"--ratio must be in (0, {MAX_RATIO}], got {self.ratio}",
                "it is the fraction of all parameters to remove, e.g. 0.2")
        require(self.importance in imp.METHODS, f"unknown --importance '{self.importance}'",
                f"use one of {', '.join(imp.METHODS)}")
        require(self.nsamples > 0, f"--nsamples must be positive, got {self.nsamples}")
        require(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        require(self.multiple_of >= 1, f"--multiple-of must be at least 1, got {self.multiple_of}")
        self.split_share()
        require(self.layers.strip().lower() == "all" or _parse_layers(self.layers, 10**6) is not None,
                f"invalid --layers '{self.layers}'", "use all or a Python slice such as 1:-1")
        parse_dtype(self.dtype, parse_device(self.device))
        check_source(self.calib, "--calib", "calib", self.data_dir)
        if (Path(self.model).expanduser() / "config.json").is_file():
            plan(_config_of(resolve(self.model)), self)   # --ratio and --layers against this model's widths

    def split_share(self) -> float | None:
        """None for auto, else the share of the removed parameters to take from attention."""
        value = str(self.split).strip().lower()
        if value == "auto":
            return None
        if value == "mlp":
            return 0.0
        try:
            share = float(value)
        except ValueError:
            raise UserError(f"invalid --split '{self.split}'", hint=f"use {SPLITS}") from None
        require(0.0 <= share <= 1.0, f"--split must be in [0, 1], got {share}", f"use {SPLITS}")
        return share


def _parse_layers(spec: str, n: int) -> list[int] | None:
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(n))
    parts = spec.split(":")
    if len(parts) != 2:
        return None
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        return None
    return list(range(n))[slice(*bounds)]


@dataclass
class Plan:
    geo: Geometry
    total: int              # parameters before
    embeddings: int
    budget: float           # parameters to remove
    options: list[Candidate]


def _config_of(source) -> object | None:
    """The config object for early checks, without loading weights (None when only loading tells)."""
    from transformers import AutoConfig

    if source.kind in ("dir", "alias"):
        raw = read_config(source.path)
        if raw.get("quantization_config"):
            _refuse_quantized(quant_method(raw) or "unknown method", source.spec)
        return AutoConfig.from_pretrained(source.path)
    return None


def _refuse_quantized(method: str | None, spec: str) -> None:
    if method:
        raise UserError(f"{spec} is already quantized ({method}); pruning needs the full-precision weights",
                        hint="prune the original model, then run llmopt quantize on the pruned output")


def plan(config, opts: PruneOptions) -> Plan:
    """Widths that meet --ratio for this config; UserError when it cannot be met. No weights needed."""
    from transformers import AutoModelForCausalLM

    arch = arch_for(text_config(config))
    geo = geometry(config, arch)
    chosen = _parse_layers(opts.layers, geo.layers)
    if chosen is None or not chosen:
        raise UserError(f"--layers '{opts.layers}' selects no layer of the {geo.layers}", hint="use all")
    if len(chosen) != geo.layers:
        skipped = sorted(set(range(geo.layers)) - set(chosen))
        raise UserError(f"--layers {opts.layers} would leave layers {skipped} at full width, but a standard "
                        f"{text_config(config).model_type} config gives every layer the same widths",
                        hint="use --layers all (reconstruction, on by default, protects sensitive layers)")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    total = count_parameters(meta)
    embeddings = embedding_parameters(meta)
    del meta
    budget = opts.ratio * total
    share = opts.split_share()
    options = candidates(geo, budget, opts.multiple_of)
    if share == 0.0:
        options = [c for c in options if c.attention_removed == 0]
    most = max_removable(geo, opts.multiple_of)
    if not options or budget > most:
        how = "from the MLP alone (--split mlp)" if share == 0.0 else \
            "while keeping one query head per KV group and --multiple-of MLP channels"
        raise UserError(f"--ratio {opts.ratio} is too high: removing {budget / 1e6:.1f}M of {total / 1e6:.1f}M "
                        f"parameters cannot be done {how} (width pruning leaves the {embeddings / 1e6:.1f}M "
                        f"embedding parameters alone; at most {most / total:.1%} can go)",
                        hint="lower --ratio" + (" or use --split auto" if share == 0.0 else ""))
    if share is not None and share > 0:
        target = share * budget
        best = min(options, key=lambda c: (abs(c.attention_removed - target), abs(c.removed - budget)))
        options = [best]
    return Plan(geo, total, embeddings, budget, options)


def _same(c: Candidate, geo: Geometry) -> bool:
    return c.widths == Widths(geo.heads, geo.kv_heads, geo.intermediate)


def prune(opts: PruneOptions, progress: Progress = SILENT) -> dict:
    """Run `llmopt prune`; returns the JSON-able summary also written to llmopt.json."""
    started = time.time()
    opts.validate()
    out = check_output(opts.output, opts.force)
    source = local_dir(opts.model, progress)
    config = _config_of(source)
    the_plan = plan(config, opts) if config is not None else None

    loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, progress=progress)
    model, tok = loaded.model, loaded.tokenizer
    if the_plan is None:   # hub / gguf: the config is known only now
        q = getattr(model.config, "quantization_config", None)
        if q is not None:
            _refuse_quantized(quant_method(model.config.to_dict()) or "unknown method", opts.model)
        the_plan = plan(model.config, opts)
    arch = arch_for(text_config(model.config))
    geo = the_plan.geo

    calib = resolve_auto(opts.calib, opts.data_dir)   # the same `auto` that validate() checked
    windows, calib_description = text_windows(tok, calib, "calib", opts.seq_len, nsamples=opts.nsamples,
                                              seed=opts.seed, directory=opts.data_dir)
    # Splits are compared on windows the reconstruction did not see, so a refit that overfits the
    # calibration windows cannot win.
    selection, _ = text_windows(tok, calib, "calib", opts.seq_len, nsamples=min(SELECTION_WINDOWS, opts.nsamples),
                                seed=opts.seed + 7919, directory=opts.data_dir)

    grams = slicing.Grams() if opts.reconstruct or opts.importance in imp.NEEDS_GRAMS else None
    with grams.capture(model, arch) if grams else nullcontext():
        if opts.importance in imp.NEEDS_GRADIENTS:
            scores, _ = imp.scores(opts.importance, model, arch, geo, windows, opts.seed, progress)
        else:
            scores, _ = imp.scores(opts.importance, model, arch, geo, None, opts.seed, progress)
            if grams is not None:
                slicing.forward_all(model, windows, progress, "Collecting calibration statistics")
    if opts.importance in imp.NEEDS_GRAMS:
        refit = imp.refit_scores(model, arch, geo, grams.attn, grams.mlp, slicing.RECONSTRUCT_DAMP)
        scores = refit if scores is None else imp.combine(scores, refit, geo)
    if not opts.reconstruct:
        grams = None
    loss_before = slicing.calibration_loss(model, selection)

    tried = []
    options = [c for c in the_plan.options if not _same(c, geo)] or the_plan.options[:1]
    if len(options) > 1:
        progress.start("Choosing the attention/MLP split", total=len(options))
        for c in options:
            keeps = slicing.choose(scores, geo, c.widths)
            with slicing.masked(model, arch, geo, keeps, grams):
                loss = slicing.calibration_loss(model, selection)
            tried.append({"widths": asdict(c.widths), "removed": c.removed, "attention_removed": c.attention_removed,
                          "calibration_loss": round(loss, 4)})
            progress.advance(1, loss=loss)
        progress.finish()
        best = min(range(len(options)), key=lambda i: tried[i]["calibration_loss"])
        chosen = options[best]
    else:
        chosen = options[0]
    progress.note(f"keeping {chosen.widths.describe()} in each of the {geo.layers} layers")

    keeps = slicing.choose(scores, geo, chosen.widths)
    slicing.apply(model, arch, geo, chosen.widths, keeps, grams, progress)
    del grams
    loss_after = slicing.calibration_loss(model, selection)

    after = count_parameters(model)
    emb = embedding_parameters(model)
    metrics = {
        "parameters_before": the_plan.total,
        "parameters_after": after,
        "parameters_removed": the_plan.total - after,
        "ratio_requested": opts.ratio,
        "ratio_achieved": round((the_plan.total - after) / the_plan.total, 5),
        "embedding_parameters": emb,
        "decoder_parameters_before": the_plan.total - the_plan.embeddings,
        "decoder_parameters_after": after - emb,
        "decoder_ratio_achieved": round((the_plan.total - after) / (the_plan.total - the_plan.embeddings), 5),
        "widths_before": asdict(Widths(geo.heads, geo.kv_heads, geo.intermediate)),
        "widths_after": asdict(chosen.widths),
        "attention_parameters_removed": chosen.attention_removed,
        "mlp_parameters_removed": chosen.removed - chosen.attention_removed,
        "calibration_loss_before": round(loss_before, 4),
        "calibration_loss_after": round(loss_after, 4),
        "calibration_loss_windows": len(selection),
        "splits_tried": tried,
    }
    record = provenance("prune", opts.model, opts, started, metrics, calibration=calib_description)
    save_pretrained(model, tok, out, opts.force, record)
    return {"output": str(out), "model": opts.model, "importance": opts.importance, **metrics,
            "calibration": calib_description, "wall_time_s": record["wall_time_s"]}


__all__ = ["PruneOptions", "prune", "plan"]
