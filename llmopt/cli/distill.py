"""`llmopt distill --teacher BIG --student SMALL -o OUT`: knowledge distillation with a held-out best checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli.common import DataDir, Device, Force, Json, RichProgress, app, err_console, human_count, print_json
from llmopt.distill import PRECISIONS, DistillOptions, distill as run_distill
from llmopt.distill.losses import LOSSES

D = DistillOptions


@app.command()
def distill(
    teacher: Annotated[str, typer.Option(help="The model to imitate (directory, .gguf, hub id or alias); frozen.")],
    student: Annotated[str, typer.Option(help="The model to train: a pruned llmopt output or any smaller model "
                                              "with the teacher's tokenizer. Not a quantized one.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory for the best student "
                                                               "(written atomically).")],
    data: Annotated[str, typer.Option(help="Training text: auto (wikitext2 when a data dir is set, else builtin), "
                                           "wikitext2 (its train split; wiki.valid.raw offline when "
                                           "wiki.train.raw is absent), c4, builtin or a .txt/.jsonl path. The "
                                           "last --eval-windows windows are held out.")] = D.data,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = D.steps,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed training / held-out sequence.")] = D.seq_len,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch (per process).")] = D.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches accumulated per optimizer step.")] = D.grad_accum,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (linear warmup, then cosine to 0).")] = D.lr,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = D.warmup_steps,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0 = no clipping).")
                             ] = D.max_grad_norm,
    loss: Annotated[str, typer.Option(help=f"Divergence: {', '.join(LOSSES)}. fkl = KL(teacher||student) "
                                           "(default), rkl = KL(student||teacher), jsd = generalized "
                                           "Jensen-Shannon with --beta. All are scaled by T^2.")] = D.loss,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T applied to both models' logits.")
                           ] = D.temperature,
    beta: Annotated[float, typer.Option(help="jsd only: teacher weight in the mixture, in (0, 1).")] = D.beta,
    alpha_ce: Annotated[float, typer.Option(help="Weight of the ordinary next-token loss; the divergence gets "
                                                 "1 - alpha.")] = D.alpha_ce,
    hidden_mse: Annotated[float, typer.Option(help="Weight of a relative MSE between hidden states of matched "
                                                   "layers (needs equal hidden sizes, as after width pruning).")
                          ] = D.hidden_mse,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every N steps (0 = only before and after); "
                                                 "the best checkpoint is the one written.")] = D.eval_every,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows of --seq-len tokens.")] = D.eval_windows,
    synthetic_windows: Annotated[int, typer.Option(help="Also train on this many windows the teacher writes, each "
                                                        "continuing 32 tokens of the training text (top-p 0.95): "
                                                        "more text when the corpus is small. Written before "
                                                        "training, within half of --max-minutes.")
                                 ] = D.synthetic_windows,
    ema: Annotated[float, typer.Option(help="Also score an exponential moving average of the student's weights "
                                            "with this decay (0 = off; 0.99 averages about the last 100 steps) "
                                            "and keep it when it scores better: steadier on a small corpus.")
                   ] = D.ema,
    freeze_embeddings: Annotated[bool, typer.Option("--freeze-embeddings",
                                                    help="Do not train the input embedding and the output head "
                                                         "(tied or not): fewer weights to update, and no Adam "
                                                         "steps on the rows of tokens the text never uses.")
                                 ] = D.freeze_embeddings,
    max_minutes: Annotated[float | None, typer.Option(help="Stop training after this many minutes (the last "
                                                           "evaluation and the save come after).")
                           ] = D.max_minutes,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Recompute student activations in the backward "
                                                              "pass: less memory, about a third slower.")
                                      ] = D.gradient_checkpointing,
    seed: Annotated[int, typer.Option(help="Seed for batch order and initialization.")] = D.seed,
    data_dir: DataDir = None,
    device: Device = D.device,
    dtype: Annotated[str, typer.Option("--dtype", help="The teacher's dtype: auto (bfloat16 on CUDA, float32 on "
                                                       "CPU), float32, bfloat16 or float16. The student always "
                                                       "trains in float32 weights (see --precision) and is "
                                                       "saved in its original dtype.")] = D.dtype,
    precision: Annotated[str, typer.Option(help=f"{', '.join(PRECISIONS)}: the arithmetic of both models' forward "
                                                "passes. auto = bf16 autocast on a GPU with bf16, float32 "
                                                "elsewhere. bf16 on a CPU with AMX is about 1.4x faster per "
                                                "step but learned less per step in our measurement.")] = D.precision,
    force: Force = False,
    json: Json = False,
) -> None:
    """Train a smaller student to match a teacher's next-token distributions; keep the best checkpoint.

    Several GPUs: accelerate launch -m llmopt distill ... (DDP; FSDP through an accelerate config).
    Ctrl-C saves the best checkpoint so far and exits with code 130.
    """
    opts = DistillOptions(teacher=teacher, student=student, output=output, data=data, steps=steps, seq_len=seq_len,
                          batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
                          max_grad_norm=max_grad_norm, loss=loss, temperature=temperature, beta=beta,
                          alpha_ce=alpha_ce, hidden_mse=hidden_mse, eval_every=eval_every, eval_windows=eval_windows,
                          synthetic_windows=synthetic_windows, ema=ema, freeze_embeddings=freeze_embeddings,
                          max_minutes=max_minutes, gradient_checkpointing=gradient_checkpointing, seed=seed,
                          data_dir=data_dir, device=device, dtype=dtype, precision=precision, force=force)
    _report(run_distill(opts, RichProgress(not json)), loss, output, json)


def _report(summary: dict, loss: str, output: str, json: bool) -> None:
    """The summary as JSON or a table, from the main process only; exit 130 after an interrupt."""
    from accelerate import PartialState

    if not PartialState().is_main_process:   # under accelerate launch / torchrun, one process reports
        return
    if json:
        print_json(summary)
    else:
        table = Table(title=f"llmopt distill ({loss}, {summary['steps_done']} steps, "
                            f"{human_count(summary['tokens_trained'])} tokens)", title_justify="left")
        table.add_column("held-out perplexity")
        table.add_column("", justify="right")
        table.add_row("teacher", f"{summary['teacher_heldout_ppl']:.3f}")
        table.add_row("student before", f"{summary['student_heldout_ppl_before']:.3f}")
        table.add_row(f"student best (step {summary['best_step']}, {summary['best_weights']} weights)",
                      f"{summary['student_heldout_ppl_best']:.3f}")
        err_console.print(table)
        if summary["stopped"] == "time budget":
            err_console.print(f"stopped by --max-minutes after {summary['steps_done']} steps", highlight=False)
    if summary["stopped"] == "interrupted":
        err_console.print(f"[yellow]interrupted[/yellow]: the best checkpoint so far (step {summary['best_step']}) "
                          f"was saved to {output}", highlight=False)
        raise typer.Exit(130)
    if not json:
        err_console.print(f"[green]wrote[/green] {output}", highlight=False)
