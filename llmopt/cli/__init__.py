"""The command line: parse options, call one function per command, render the result.

Each subcommand lives in its own module and registers itself on `app`; nothing here computes.
Exit codes: 0 ok, 1 runtime failure, 2 usage / bad input, 130 interrupted.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.markup import escape

from llmopt.cli.common import app, err_console
from llmopt.errors import UserError

COMMANDS = ("info", "generate", "bench", "quantize", "prune", "distill", "run")

for _name in COMMANDS:
    try:
        importlib.import_module(f"llmopt.cli.{_name}")
    except ModuleNotFoundError as _e:  # a command whose module is not written yet
        if _e.name != f"llmopt.cli.{_name}":
            raise


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point with exit codes scripts can trust."""
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # spinning OpenMP threads stall shared CPUs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmopt draws its own; transformers' bars would interleave
    hf_logging.set_verbosity_error()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="llmopt")
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:   # bad flags, missing arguments: typer's usage errors
        e.show()
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("[red]interrupted[/red]: stopped; no partial output was left behind")
        sys.exit(130)
    except UserError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        if os.environ.get("LLMOPT_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {type(e).__name__}: {escape(str(e))} "
                          "(set LLMOPT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "typer"]
