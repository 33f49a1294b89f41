"""`llmopt run RECIPE`: run a YAML recipe (prune -> distill -> quantize -> bench), resumably."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmopt import recipes
from llmopt.cli.common import Json, RichProgress, app, err_console, print_json


def _wide() -> Console:
    """A log file is no terminal: let tables take the width they need instead of rich's 80 columns."""
    return err_console if err_console.is_terminal else Console(stderr=True, width=240)


@app.command("run")
def run_recipe(
    recipe: Annotated[Path, typer.Argument(help="The recipe: a YAML file with model, out and steps "
                                                "(see recipes/ and docs/recipes.md).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate everything and print the plan (steps, "
                                                            "inputs, outputs, run or skip); run nothing.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE",
        help="Override a recipe value (repeatable): a top-level key (model, out, data_dir, device, dtype), "
             "STEP.option (e.g. prune.ratio=0.3) or steps.N.option (N from 1). VALUE is read as YAML.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun every step, overwriting outputs that exist "
                                                        "(by default finished steps are skipped).")] = False,
    json: Json = False,
) -> None:
    """Run the steps of a recipe (prune, distill, quantize, bench) in order; each step takes the options of
    the command of the same name, with the same defaults.

    The whole recipe is validated before the first step runs. A step whose output exists with the same
    recorded parameters and inputs is skipped, so an interrupted recipe resumes where it stopped; one
    whose inputs changed reruns; an output with other parameters stops the run before it starts
    (use --force). At the end: one table with a row per
    stage (base, pruned, distilled, quantized) when the recipe has a bench step.
    """
    plan = recipes.load(recipe, set_ or [], force=force)
    if dry_run:
        if json:
            print_json(plan.plan_dict())
        else:
            _wide().print(plan_table(plan))
            err_console.print("[dim]dry run: everything validated, nothing ran[/dim]", highlight=False)
        return
    if not json:
        _wide().print(plan_table(plan))
    total = len(plan.steps)

    def announce(step: recipes.Step) -> None:
        if json:
            return
        verb = "[dim]skip[/dim]" if step.status == "skip" else "[bold]run[/bold]"
        err_console.print(f"{verb} step {step.index}/{total} [bold]{step.name}[/bold] -> {step.output}"
                          f" [dim]({step.reason})[/dim]", highlight=False)

    result = recipes.run(plan, RichProgress(not json), on_step=announce)
    if json:
        print_json(result)
        return
    render_stages(result)


def _brief_options(step: recipes.Step) -> str:
    """Options that differ from the command's defaults (inputs and outputs have their own columns)."""
    opts = step.options
    shown = []
    hidden = {"output", "force", *recipes.MODEL_FIELDS}
    for f in fields(opts):
        if f.name in hidden:
            continue
        value = getattr(opts, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != default:
            shown.append(f"{f.name}={value}")
    return " ".join(shown)


def plan_table(plan: recipes.Recipe) -> Table:
    table = Table(title=f"llmopt run {plan.path}  (model {plan.model}, out {plan.out})", title_justify="left")
    for col in ("#", "step", "reads", "writes", "", "options"):
        table.add_column(col, overflow="fold")
    for s in plan.steps:
        src = plan.describe_inputs(s)
        status = f"[dim]skip[/dim] ({s.reason})" if s.status == "skip" else f"[green]run[/green] ({s.reason})"
        table.add_row(str(s.index), f"{s.kind.name}" + (f" {s.name}" if s.name != s.kind.name else ""), src,
                      str(s.output), status, _brief_options(s))
    return table


def render_stages(result: dict) -> None:
    """The final picture: one row per stage, bench's own table with stage names, when a bench step ran."""
    report = result.get("report")
    title = f"llmopt run {result['recipe']}"
    if report and report.get("models"):
        from llmopt.bench.report import render_table

        labels = {stage["model"]: stage["stage"] for stage in result["stages"]}
        relabeled = dict(report, models=[dict(r, name=labels.get(r["name"], r["name"])) for r in report["models"]])
        _wide().print(render_table(relabeled, title=f"{title}: stages vs base"))
        return
    table = Table(title=f"{title}: stages (add a bench step to measure them)", title_justify="left")
    for col in ("stage", "model", "step", "status"):
        table.add_column(col)
    status = {s["name"]: s["status"] for s in result["steps"]}
    for stage in result["stages"]:
        table.add_row(stage["stage"], stage["model"], stage["step"] or "-", status.get(stage["step"], "-"))
    _wide().print(table)
