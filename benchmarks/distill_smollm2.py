"""How much of what 20% pruning costs SmolLM2-135M (or --teacher) does a CPU-budget distillation recover?

    python benchmarks/distill_smollm2.py --work /tmp/kd-bench --max-minutes 50
    python benchmarks/distill_smollm2.py --teacher gemma3-270m --student PRUNED --windows 4 --lr 1e-4

1. prunes --teacher (default smollm2-135m) by --ratio (llmopt prune with its defaults) unless --student is given;
2. distills the pruned student from the original on WikiText-2 wiki.valid.raw (llmopt distill);
3. measures wiki.test.raw perplexity (--windows x 2048 tokens, as `llmopt bench`) of the original,
   the pruned and the distilled model, and prints the fraction of the pruned->original gap recovered
   and the held-out curve (perplexity on the last --eval-windows windows of wiki.valid.raw vs steps).

Needs $LLMOPT_DATA (or --data-dir) pointing at wikitext-2-raw. Results also go to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from llmopt.bench.quality import perplexity
from llmopt.data import data_dir, load_windows
from llmopt.distill import DistillOptions, distill
from llmopt.models import load_model
from llmopt.progress import Progress


class Log(Progress):
    """Plain lines on stdout: stage starts, every `every`-th step, notes."""

    def __init__(self, every: int = 10) -> None:
        self.every, self.n, self.t0 = every, 0, time.time()

    def start(self, description, total=None):
        self.n = 0
        print(f"[{time.time() - self.t0:7.0f}s] {description}", flush=True)

    def advance(self, steps=1, **info):
        self.n += steps
        if info and self.n % self.every == 0:
            figures = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            print(f"[{time.time() - self.t0:7.0f}s]   {self.n}: {figures}", flush=True)

    def note(self, message):
        print(f"[{time.time() - self.t0:7.0f}s] {message}", flush=True)


def test_ppl(spec: str, windows: int, directory: str | None, log: Log) -> float:
    loaded = load_model(spec, device="cpu")
    ids = load_windows(loaded.tokenizer, "wikitext2", "eval", 2048, max_windows=windows, directory=directory)
    t0 = time.time()
    ppl = perplexity(loaded.model, ids)
    log.note(f"wiki.test.raw perplexity of {spec}: {ppl:.3f} ({len(ids.ids)} x 2048 tokens, {time.time() - t0:.0f}s)")
    return ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/llmopt-distill-bench", help="folder for the pruned / distilled models")
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--student", default=None, help="an already pruned student (default: prune the teacher)")
    ap.add_argument("--ratio", type=float, default=0.2, help="pruning ratio when pruning here")
    ap.add_argument("--windows", type=int, default=32, help="wiki.test.raw windows of 2048 tokens")
    ap.add_argument("--max-minutes", type=float, default=50.0, help="distillation time budget")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--loss", default="fkl")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alpha-ce", type=float, default=0.0)
    ap.add_argument("--hidden-mse", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--synthetic-windows", type=int, default=0, help="teacher-written training windows")
    ap.add_argument("--ema", type=float, default=0.0, help="llmopt distill --ema")
    ap.add_argument("--freeze-embeddings", action="store_true", help="llmopt distill --freeze-embeddings")
    ap.add_argument("--dtype", default="auto", help="the teacher's dtype")
    ap.add_argument("--precision", default="auto", help="llmopt distill --precision")
    ap.add_argument("--end-by", default=None, metavar="HH:MM",
                    help="UTC time by which everything must be done: shortens --max-minutes to leave room for "
                         "the last perplexity measurement (estimated from the pruned model's)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--skip-baselines", action="store_true",
                    help="reuse the original / pruned perplexities from WORK/results.json")
    args = ap.parse_args()

    directory = args.data_dir or (str(data_dir()) if data_dir() else None)
    if directory is None:
        sys.exit("set $LLMOPT_DATA or --data-dir to the wikitext-2-raw folder")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = Log()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    student = args.student
    if student is None:
        from llmopt.prune import PruneOptions, prune

        student = str(work / f"pruned-{args.ratio:g}")
        if not Path(student).is_dir():
            summary = prune(PruneOptions(model=args.teacher, output=student, ratio=args.ratio, data_dir=directory,
                                         device="cpu"), log)
            log.note(f"pruned: {summary['ratio_achieved']:.2%} of parameters removed")

    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not (args.skip_baselines and "original_ppl" in results):
        results["original_ppl"] = test_ppl(args.teacher, args.windows, directory, log)
        t0 = time.time()
        results["pruned_ppl"] = test_ppl(student, args.windows, directory, log)
        results["pruned_eval_s"] = time.time() - t0
    results.update(windows=args.windows, teacher=args.teacher, student=student)
    results_file.write_text(json.dumps(results, indent=2))

    budget = args.max_minutes
    if args.end_by:
        now = time.gmtime()
        hh, mm = (int(x) for x in args.end_by.split(":"))
        left = (hh * 60 + mm) - (now.tm_hour * 60 + now.tm_min + now.tm_sec / 60)
        reserve = 1.3 * results.get("pruned_eval_s", 600) / 60 + 2   # final eval, loading, saving
        budget = max(1.0, min(budget, left - reserve))
        log.note(f"distillation budget {budget:.1f} min (to end by {args.end_by} UTC)")
    results["budget_minutes"] = budget

    out = work / "distilled"
    opts = DistillOptions(teacher=args.teacher, student=student, output=str(out), data="wikitext2",
                          steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps, loss=args.loss,
                          temperature=args.temperature, alpha_ce=args.alpha_ce, hidden_mse=args.hidden_mse,
                          eval_every=args.eval_every, eval_windows=args.eval_windows, max_minutes=budget,
                          synthetic_windows=args.synthetic_windows, ema=args.ema,
                          freeze_embeddings=args.freeze_embeddings, dtype=args.dtype, precision=args.precision,
                          data_dir=directory, device="cpu", force=True)
    cpu0 = time.process_time()
    summary = distill(opts, log)
    results["distill_process_cpu_minutes"] = (time.process_time() - cpu0) / 60
    results["distill"] = summary
    results["distilled_ppl"] = test_ppl(str(out), args.windows, directory, log)
    orig, pruned, kd = results["original_ppl"], results["pruned_ppl"], results["distilled_ppl"]
    results["gap_recovered"] = (pruned - kd) / (pruned - orig)
    # the same in log-perplexity (nats per token), which is what training lowers
    results["gap_recovered_nll"] = (math.log(pruned) - math.log(kd)) / (math.log(pruned) - math.log(orig))
    results_file.write_text(json.dumps(results, indent=2))

    print()
    print(f"wiki.test.raw perplexity, {args.windows} x 2048 tokens")
    print(f"  original {args.teacher:>22}: {orig:8.3f}")
    print(f"  pruned                        : {pruned:8.3f}")
    print(f"  distilled ({summary['steps_done']} steps, {summary['tokens_trained']} tokens, "
          f"{summary['train_seconds'] / 60:.1f} min wall, "
          f"{results['distill_process_cpu_minutes']:.1f} min process CPU, stopped: {summary['stopped']}, best step "
          f"{summary['best_step']}): {kd:8.3f}")
    if summary["synthetic_windows"]:
        print(f"  ({summary['synthetic_windows']} teacher-written windows, {summary['synthetic_seconds'] / 60:.1f} "
              "min of the budget)")
    print(f"  gap recovered: {results['gap_recovered']:.1%} of perplexity, "
          f"{results['gap_recovered_nll']:.1%} of log-perplexity")
    print()
    print(f"held-out curve (last {args.eval_windows} x {args.seq_len} tokens of wiki.valid.raw; teacher "
          f"{summary['teacher_heldout_ppl']:.3f})")
    print("  step  tokens  minutes  held-out ppl  train loss  averaged weights")
    for row in summary["curve"]:
        loss = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        averaged = f"{row['ppl_average']:16.3f}" if "ppl_average" in row else ""
        print(f"  {row['step']:4d}  {row['tokens']:6d}  {row['elapsed_s'] / 60:7.1f}  {row['ppl']:12.3f}  {loss:>10}"
              f"  {averaged}")
    print(f"  kept: step {summary['best_step']}, {summary['best_weights']} weights")


if __name__ == "__main__":
    main()
