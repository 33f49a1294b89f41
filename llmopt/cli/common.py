"""Pieces every command shares: the app, consoles, common options, progress bars, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBar, SpinnerColumn, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperGroup

from llmopt.progress import Progress


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) unwound a command; raised past typer, which would turn it into a silent exit 130."""


class _Group(TyperGroup):
    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Interrupted() from e


app = typer.Typer(
    cls=_Group,
    name="llmopt",
    help="Make a Hugging Face causal language model smaller and faster, and measure what it cost.\n\n"
         "MODEL is a local directory, a .gguf file, a hub id (org/name, online) or an offline alias "
         "(smollm2-135m, gemma3-270m). Human output goes to stderr, --json output to stdout. "
         "Exit codes: 0 ok, 1 runtime failure, 2 bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True)

Device = Annotated[str, typer.Option("--device", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, "
                                                    "bfloat16 or float16.")]
Head = Annotated[str, typer.Option("--head", help="How llmopt's runtime serves a quantized checkpoint's "
                                                  "full-precision output head: auto (mixed on CPU, full "
                                                  "elsewhere), mixed (8-bit for the rows the model finds "
                                                  "likely, 4-bit for the rest: about 5x fewer bytes per token "
                                                  "than float32, near int8's quality), int8 (4x "
                                                  "fewer), int4 (6x fewer; costs more quality), or full "
                                                  "(as stored).")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON object on stdout instead of human output.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists: --force replaces only an earlier "
                                                     "llmopt output or an empty folder.")]
DataDir = Annotated[str | None, typer.Option("--data-dir", help="Folder with wiki.test.raw / wiki.valid.raw "
                                                                "for wikitext2 (default: $LLMOPT_DATA).")]


class RichProgress(Progress):
    """Progress bars on stderr (plain start lines when stderr is not a terminal); silent if show=False."""

    def __init__(self, show: bool = True) -> None:
        self.show = show
        self.bar: RichBar | None = None
        self.task = None

    def start(self, description: str, total: int | None = None) -> None:
        self.finish()
        if not self.show:
            return
        if not err_console.is_terminal:
            err_console.print(f"[dim]{description}...[/dim]", highlight=False)
            return
        self.bar = RichBar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                           console=err_console)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, info="")

    def advance(self, steps: int = 1, **info: Any) -> None:
        if self.bar is not None:
            text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
            self.bar.update(self.task, advance=steps, info=text)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def note(self, message: str) -> None:
        if self.show:
            err_console.print(f"[yellow]note:[/yellow] {message}", highlight=False)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def human_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
