"""Knowledge distillation: train a smaller student (e.g. a pruned llmopt output) to imitate its teacher.

`distill(opts)` validates, checks the output path, reads the training text and compares the two
tokenizers before loading any weights, then loads a frozen teacher and a float32 student, trains
(`loop`), and writes the student weights with the lowest held-out perplexity as a standard
checkpoint. Training text is the `train` split of `--data` (for WikiText-2 offline that is
wiki.valid.raw, since wiki.test.raw is what `llmopt bench` reports), cut as bench cuts its evaluation
text (`llmopt.data.cut_eval`: BOS first in every window when the tokenizer adds one, as Gemma's
does); its last `--eval-windows` windows are held out for the perplexity that picks the best
checkpoint, scored as bench scores (the prediction from the BOS alone is not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.checkpoint import atomic_output, check_output, provenance, write_provenance
from llmopt.data import Text, Windows, bos_id, check_source, cut_eval, load_text, resolve_auto, text_per_window, \
    tokenize, tokenize_corpus
from llmopt.distill.losses import LOSSES
from llmopt.distill.loop import LoopConfig, Result, train, trained_weights
from llmopt.errors import UserError, require
from llmopt.info import count_parameters
from llmopt.models import LoadedModel, Source, load_model, local_dir, parse_device, parse_dtype, quant_method, \
    read_config
from llmopt.progress import SILENT, Progress


PRECISIONS = ("auto", "bf16", "float32")


@dataclass
class DistillOptions:
    teacher: str
    student: str
    output: str
    data: str = "auto"                  # auto = wikitext2 when a data dir is set, else builtin; or a file
    steps: int = 300                    # optimizer steps
    seq_len: int = 512
    batch_size: int = 4                 # sequences per micro-batch (per process)
    grad_accum: int = 1                 # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0          # 0 disables clipping
    loss: str = "fkl"                   # fkl | rkl | jsd
    temperature: float = 1.0
    beta: float = 0.5                   # jsd mixture weight of the teacher
    alpha_ce: float = 0.0               # weight of the next-token loss; the divergence gets 1 - alpha_ce
    hidden_mse: float = 0.0             # weight of the hidden-state loss (same hidden size only)
    eval_every: int = 50                # 0 = evaluate only before and after training
    eval_windows: int = 16              # held-out windows of seq_len tokens
    synthetic_windows: int = 0          # windows the teacher samples (continuing the text) to train on too
    ema: float = 0.0                    # decay of a moving average of the student's weights, also scored (0 = off)
    freeze_embeddings: bool = False     # keep the input embedding and the output head (tied or not) as they are
    max_minutes: float | None = None    # training time budget
    gradient_checkpointing: bool = False
    seed: int = 0
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"                 # the teacher's dtype; the student trains in float32 weights
    precision: str = "auto"             # auto (bf16 on a GPU with bf16, else float32) | bf16 | float32
    force: bool = False

    def validate(self) -> None:
        require(bool(self.output), "no output directory given", "pass -o OUT")
        require(bool(self.teacher and self.student), "both --teacher and --student are needed")
        require(self.steps > 0, f"--steps must be positive, got {self.steps}")
        require(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(self.warmup_steps >= 0, f"--warmup-steps cannot be negative, got {self.warmup_steps}")
        require(self.max_grad_norm >= 0, f"--max-grad-norm cannot be negative, got {self.max_grad_norm}")
        require(self.loss in LOSSES, f"unknown --loss '{self.loss}'", f"use one of {', '.join(LOSSES)}")
        require(self.temperature > 0, f"--temperature must be positive, got {self.temperature}")
        require(self.loss != "jsd" or 0 < self.beta < 1, f"--beta must be in (0, 1) for jsd, got {self.beta}",
                "beta -> 0 and beta -> 1 approach the forward and reverse KL: use --loss fkl / rkl for those")
        require(0 <= self.alpha_ce <= 1, f"--alpha-ce must be in [0, 1], got {self.alpha_ce}")
        require(self.hidden_mse >= 0, f"--hidden-mse cannot be negative, got {self.hidden_mse}")
        require(self.eval_every >= 0, f"--eval-every cannot be negative, got {self.eval_every}")
        require(self.eval_windows > 0, f"--eval-windows must be positive, got {self.eval_windows}")
        require(0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}",
                "0 turns the average off; 0.99 averages over about the last 100 steps")
        require(self.synthetic_windows >= 0, f"--synthetic-windows cannot be negative, got {self.synthetic_windows}")
        require(self.max_minutes is None or self.max_minutes > 0,
                f"--max-minutes must be positive, got {self.max_minutes}")
        require(self.precision in PRECISIONS, f"unknown --precision '{self.precision}'",
                f"use one of {', '.join(PRECISIONS)}")
        parse_device(self.device)
        parse_dtype(self.dtype, torch.device("cpu"))
        check_source(self.data, "--data", "train", self.data_dir)


# --------------------------------------------------------------------------- checks before loading weights

def _raw_config(source: Source) -> dict | None:
    return read_config(source.path) if source.kind in ("dir", "alias") else None


def _refuse_quantized(raw: dict | None, spec: str) -> None:
    if raw is not None and raw.get("quantization_config"):
        method = quant_method(raw) or "unknown method"
        raise UserError(f"student {spec} is quantized ({method}); distillation trains full-precision weights",
                        hint="distill the unquantized student, then run llmopt quantize on the result")


def _hidden_size(raw: dict | None) -> int | None:
    if raw is None:
        return None
    return (raw.get("text_config") or {}).get("hidden_size") or raw.get("hidden_size")


def _tokenizer(source: Source):
    from transformers import AutoTokenizer

    if source.kind not in ("dir", "alias"):
        return None
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise UserError(f"{source.spec} has no usable tokenizer: {e}",
                        hint="save the tokenizer next to the weights (tokenizer.save_pretrained)") from e


def check_tokenizers(teacher_tok, student_tok, sample: str) -> None:
    """Distillation compares distributions token by token, so both sides must mean the same ids."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        differ = len(set(tv.items()) ^ set(sv.items())) // 2
        raise UserError(f"teacher and student tokenizers differ ({len(tv)} vs {len(sv)} tokens, about {differ} "
                        "entries disagree); distillation needs the same vocabulary on both sides",
                        hint="use a student derived from the teacher (e.g. llmopt prune) or of the same family")
    probe = sample[:4000]
    if tokenize(teacher_tok, probe).tolist() != tokenize(student_tok, probe).tolist():
        raise UserError("teacher and student tokenizers share a vocabulary but split text differently",
                        hint="use the teacher's tokenizer files for the student")


def _check_vocab(model, tokenizer, role: str) -> int:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UserError(f"the {role}'s output layer has {rows} rows for a tokenizer of {len(tokenizer)} tokens")
    return rows


def training_windows(tokenizer, text: str, seq_len: int, eval_windows: int, batch_size: int
                     ) -> tuple[torch.Tensor, Windows]:
    """Training sequences [n, seq_len] and the held-out last `eval_windows` windows, cut as bench cuts its
    evaluation text (`cut_eval`: non-overlapping, BOS first when the tokenizer adds one, so the student
    sees its input as the model was trained to) and scored as bench scores them (BOS's prediction not)."""
    bos = bos_id(tokenizer)
    corpus = tokenize_corpus(tokenizer, text)
    if corpus.ids.numel() // text_per_window(seq_len, bos) < eval_windows + batch_size:
        raise UserError(f"the training text has {corpus.ids.numel()} tokens: not enough for {eval_windows} held-out "
                        f"windows plus one batch of {batch_size} x {seq_len} tokens",
                        hint="use a longer text, or lower --eval-windows, --seq-len or --batch-size")
    windows = cut_eval(corpus, seq_len, None, bos)
    n_train = len(windows) - eval_windows
    return windows.ids[:n_train], windows.part(slice(n_train, None))


# --------------------------------------------------------------------------- the command

def _accelerator(device: torch.device, precision: str = "auto"):
    """`auto`: bf16 autocast (float32 weights) on a GPU with bf16, float32 on CPU. On a CPU with AMX,
    bf16 trains about 1.4x faster per step but scored worse per step in docs/distill.md, so it is
    asked for, not chosen. The teacher's forward passes run under the same autocast as the student's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    precision = "no" if precision == "float32" else precision
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        # one process may distill more than once (a recipe, a library caller) on devices that differ;
        # accelerate keeps the first run's precision process-wide unless its state is reset
        AcceleratorState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def _placement(accelerator) -> str:
    dev = accelerator.device
    if dev.type == "cuda":
        return f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    return dev.type


@dataclass
class _Inputs:
    """What is checked before any weights load: a bad pair or too little text fails in seconds."""
    student_config: dict | None
    text: Text
    teacher_tok: Any                    # None when the teacher's tokenizer comes only with its weights
    student_tok: Any
    windows: tuple[torch.Tensor, Windows] | None   # cut with student_tok when there is one


def _cut(opts: DistillOptions, tokenizer, text: Text) -> tuple[torch.Tensor, Windows]:
    return training_windows(tokenizer, text.text, opts.seq_len, opts.eval_windows, opts.batch_size)


def _check_inputs(opts: DistillOptions, progress: Progress) -> _Inputs:
    """Configs, training text and tokenizers of both sides, compared before the (slow) weights load."""
    t_src = local_dir(opts.teacher, progress)
    s_src = local_dir(opts.student, progress)
    t_raw, s_raw = _raw_config(t_src), _raw_config(s_src)
    _refuse_quantized(s_raw, opts.student)
    if opts.hidden_mse > 0 and None not in (_hidden_size(t_raw), _hidden_size(s_raw)) \
            and _hidden_size(t_raw) != _hidden_size(s_raw):
        raise UserError(f"--hidden-mse needs equal hidden sizes, but the teacher has {_hidden_size(t_raw)} and the "
                        f"student {_hidden_size(s_raw)}", hint="drop --hidden-mse (logit distillation still works)")
    source = resolve_auto(opts.data, opts.data_dir)
    text = load_text(source, "train", opts.data_dir)
    t_tok, s_tok = _tokenizer(t_src), _tokenizer(s_src)
    if t_tok is not None and s_tok is not None:
        check_tokenizers(t_tok, s_tok, text.text)
    windows = _cut(opts, s_tok, text) if s_tok is not None else None   # too little text fails before any weights
    return _Inputs(s_raw, text, t_tok, s_tok, windows)


def _load_pair(opts: DistillOptions, inputs: _Inputs, where: str, progress: Progress
               ) -> tuple[LoadedModel, LoadedModel]:
    """Teacher (in --dtype) and float32 student, with the checks only loaded models allow (hub / gguf sources)."""
    teacher = load_model(opts.teacher, device=where, dtype=opts.dtype, progress=progress)
    student = load_model(opts.student, device=where, dtype="float32", progress=progress)
    if getattr(student.model.config, "quantization_config", None) is not None:   # hub / gguf students
        _refuse_quantized(student.model.config.to_dict(), opts.student)
    if inputs.teacher_tok is None or inputs.student_tok is None:
        check_tokenizers(teacher.tokenizer, student.tokenizer, inputs.text.text)
    _check_vocab(teacher.model, student.tokenizer, "teacher")
    _check_vocab(student.model, student.tokenizer, "student")
    if opts.hidden_mse > 0 and teacher.model.config.get_text_config().hidden_size != \
            student.model.config.get_text_config().hidden_size:
        raise UserError("--hidden-mse needs equal hidden sizes in teacher and student",
                        hint="drop --hidden-mse")
    return teacher, student


def _trainable(model, gradient_checkpointing: bool, freeze_embeddings: bool = False):
    """The student in training mode; no KV cache, which training never reads. Frozen embeddings: with a
    full-vocabulary loss every row of the output head gets a gradient at every step, and Adam turns even the
    tiny ones of tokens the text never uses into full-size updates."""
    model.config.use_cache = False
    if freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):     # the transformers >= 5.x name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _loop_config(opts: DistillOptions, bos: bool) -> LoopConfig:
    return LoopConfig(steps=opts.steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum, lr=opts.lr,
                      warmup_steps=opts.warmup_steps, max_grad_norm=opts.max_grad_norm, loss=opts.loss,
                      temperature=opts.temperature, beta=opts.beta, alpha_ce=opts.alpha_ce,
                      hidden_mse=opts.hidden_mse, eval_every=opts.eval_every, max_minutes=opts.max_minutes,
                      seed=opts.seed, bos=bos, synthetic_windows=opts.synthetic_windows, ema=opts.ema)


def _metrics(opts: DistillOptions, result: Result, held_out: Windows, processes: int, mixed_precision: str, student,
             teacher) -> dict:
    """The numbers recorded in llmopt.json and returned in the summary."""
    return {
        "teacher_heldout_ppl": round(result.teacher_ppl, 4),
        "student_heldout_ppl_before": result.curve[0]["ppl"],
        "student_heldout_ppl_best": round(result.best_ppl, 4),
        "best_step": result.best_step,
        "best_weights": result.best_weights,
        "steps_done": result.steps_done,
        "steps_requested": opts.steps,
        "stopped": result.stopped,
        "tokens_trained": result.tokens,
        "synthetic_windows": result.synthetic_windows,
        "synthetic_seconds": result.synthetic_seconds,
        "train_seconds": result.train_seconds,
        "processes": processes,
        "mixed_precision": mixed_precision,
        "teacher_dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
        "heldout": f"last {opts.eval_windows} windows of {opts.seq_len} tokens of the training text"
                   + (" (BOS first, its prediction not scored)" if held_out.bos else ""),
        "bos_per_window": held_out.bos,
        "curve": result.curve,
        "student_parameters": count_parameters(student),
        "trained_parameters": sum(p.numel() for p in trained_weights(student)),
        "teacher_parameters": count_parameters(teacher),
    }


def _restore_best(bare, best_state: dict, saved_dtype: str, gradient_checkpointing: bool):
    """The best weights, with inference settings and the student's saved dtype, ready to be written."""
    bare.load_state_dict(best_state)
    if gradient_checkpointing:
        (getattr(bare, "activation_checkpointing_disable", None) or bare.gradient_checkpointing_disable)()
    bare.config.use_cache = True
    bare.to(getattr(torch, str(saved_dtype).replace("torch.", ""), torch.float32)).eval()
    return bare


def _write(out: Path, force: bool, model, tokenizer, record: dict) -> None:
    """Weights, tokenizer and llmopt.json, atomically."""
    with atomic_output(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_provenance(tmp, record)


def distill(opts: DistillOptions, progress: Progress = SILENT) -> dict:
    """Run `llmopt distill`; returns the JSON-able summary also written to llmopt.json.

    When Ctrl-C stops training, the best checkpoint so far is still written (atomically) and the
    summary says `"stopped": "interrupted"`.
    """
    started = time.time()
    opts.validate()
    out = check_output(opts.output, opts.force)
    inputs = _check_inputs(opts, progress)

    accelerator = _accelerator(parse_device(opts.device), opts.precision)
    if not accelerator.is_main_process:
        progress = SILENT
    from accelerate.utils import set_seed

    set_seed(opts.seed)
    s_raw = inputs.student_config or {}
    saved_dtype = s_raw.get("dtype") or s_raw.get("torch_dtype") or "float32"
    teacher, student = _load_pair(opts, inputs, _placement(accelerator), progress)
    tok = student.tokenizer
    train_ids, held_out = inputs.windows if inputs.windows is not None else _cut(opts, tok, inputs.text)
    model = _trainable(student.model, opts.gradient_checkpointing, opts.freeze_embeddings)
    result = train(model, teacher.model, train_ids, held_out, _loop_config(opts, held_out.bos), accelerator, progress)

    metrics = _metrics(opts, result, held_out, accelerator.num_processes, str(accelerator.mixed_precision), model,
                       teacher.model)
    summary = {"output": str(out), "teacher": opts.teacher, "student": opts.student, **metrics,
               "data": inputs.text.description, "train_sequences": len(train_ids)}
    if accelerator.is_main_process:
        bare = _restore_best(accelerator.unwrap_model(model), result.best_state, saved_dtype,
                             opts.gradient_checkpointing)
        record = provenance("distill", opts.student, opts, started, metrics, teacher=opts.teacher,
                            data=inputs.text.description)
        _write(out, opts.force, bare, tok, record)
        summary["wall_time_s"] = record["wall_time_s"]
        if result.stopped == "interrupted":
            progress.note(f"interrupted after {result.steps_done} steps: saved the best checkpoint so far "
                          f"(step {result.best_step}, held-out perplexity {result.best_ppl:.3f}) to {out}")
    accelerator.wait_for_everyone()
    return summary


__all__ = ["PRECISIONS", "DistillOptions", "distill", "check_tokenizers", "training_windows"]
