"""Run the offline recipes end to end, as a user would, and print what each stage cost and bought.

    python benchmarks/recipes_e2e.py                                    # both offline recipes
    python benchmarks/recipes_e2e.py --recipe smollm2-gptq4             # the quickstart's job only
    python benchmarks/recipes_e2e.py --out /tmp/recipes --force         # rerun over an earlier run

Each recipe runs through the real command line (`llmopt run RECIPE --set out=...`) in a child
process; its human output (plan, progress, final table) goes to stdout and to OUT/NAME.log. A second
`llmopt run ... --json` then finds every step done (resume) and its JSON goes to OUT/NAME.json. Then
this prints, per recipe, the wall time of every step (from the steps' llmopt.json) and the stage table
(parameters, disk size, perplexity, KL vs base, decode tokens/s with the ratio to the base measured in
the same bench run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OFFLINE = ("smollm2-gptq4", "smollm2-prune20-distill-gptq4")


def run_recipe(name: str, out: Path, force: bool) -> tuple[dict, float]:
    """`llmopt run` as a user types it (its table goes to the log), then once more with --json, which
    finds every step done and only collects the results."""
    recipe = ROOT / "recipes" / f"{name}.yaml"
    cmd = [sys.executable, "-m", "llmopt", "run", str(recipe.relative_to(ROOT)), "--set", f"out={out / name}"]
    print(f"$ {' '.join(['llmopt'] + cmd[3:])}{' --force' if force else ''}", flush=True)
    started = time.time()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd + (["--force"] if force else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for line in proc.stderr:
            sys.stdout.write(line)
            f.write(line)
            f.flush()
        proc.wait()
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: llmopt run exited with {proc.returncode}; see {log}")
    done = subprocess.run(cmd + ["--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    result = json.loads(done.stdout)
    assert all(s["status"] == "skip" for s in result["steps"]), "a finished recipe must resume as all-skip"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, wall


def fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def report(name: str, result: dict, wall: float) -> None:
    print(f"\n## {name}  (llmopt run recipes/{name}.yaml: {wall / 60:.1f} min wall in all)\n")
    print("| step | status | wall time |")
    print("|---|---|---|")
    for s in result["steps"]:
        prov = Path(s["output"]) / "llmopt.json"
        t = json.loads(prov.read_text()).get("wall_time_s") if prov.is_file() else None
        print(f"| {s['name']} | {s['status']} | {'-' if t is None else f'{t / 60:.1f} min'} |")
    print()
    print("| stage | parameters | disk | perplexity | KL vs base | top-1 agree | decode tok/s (x base) |")
    print("|---|---|---|---|---|---|---|")
    for row in result["stages"]:
        m, d = row.get("metrics") or {}, row.get("deltas") or {}
        ppl = fmt(m.get("perplexity"))
        if d.get("perplexity"):
            ppl += f" ({d['perplexity']['pct']:+.1f}%)"
        dec = fmt(m.get("decode_tok_s"), 3)
        if d.get("decode_tok_s"):
            dec += f" ({d['decode_tok_s']['x']:.2f}x)"
        params = m.get("parameters")
        disk = m.get("disk_bytes")
        agree = m.get("top1_agreement_pct")
        print(f"| {row['stage']} | {'-' if params is None else f'{params / 1e6:.1f}M'} | "
              f"{'-' if disk is None else f'{disk / 1e6:.1f} MB'} | {ppl} | {fmt(m.get('kl_vs_baseline'), 3)} | "
              f"{'-' if agree is None else f'{agree:.1f}%'} | {dec} |")
    method = (result.get("report") or {}).get("method", {})
    settings = method.get("settings", {})
    if method:
        print(f"\nbench: {method.get('ppl_data')} ({method.get('ppl_data_description')}), "
              f"{settings.get('ppl_windows')} windows of {settings.get('seq_len')} tokens; decode "
              f"{settings.get('gen_len')} tokens after a {settings.get('prompt_len')}-token prompt, median of "
              f"{settings.get('repeats')} interleaved rounds; {method.get('device')}, "
              f"{method.get('torch_threads')} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", choices=OFFLINE, help="run only this recipe (repeatable)")
    ap.add_argument("--out", default="out/recipes-e2e", help="folder for the recipes' outputs")
    ap.add_argument("--force", action="store_true", help="rerun steps whose outputs exist")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    print(f"# recipes end to end, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"LLMOPT_DATA={os.environ.get('LLMOPT_DATA', '(unset: built-in text)')}")
    for name in args.recipe or OFFLINE:
        result, wall = run_recipe(name, out, args.force)
        report(name, result, wall)


if __name__ == "__main__":
    main()
