"""The command line: parse options, call one function per command, render the result.

Each subcommand lives in its own module and registers itself on `app`; nothing here computes.
Exit codes: 0 ok, 1 runtime failure, 2 usage / bad input, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM; unwinds like Ctrl-C, so outputs being written are removed, not left half-written).
"""

from __future__ import annotations

import os

# OpenMP reads these once, when torch's runtime loads (the command modules below import torch), so
# they are set here, before that, unless the user chose otherwise: spin-waiting threads made 2-thread
# runs 10-40x slower on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

import typer
from rich.markup import escape

from llmopt.checkpoint import take_discarded
from llmopt.cli.common import Interrupted, app, err_console
from llmopt.errors import UserError

COMMANDS = ("info", "generate", "bench", "quantize", "prune", "distill", "run", "export")

for _name in COMMANDS:
    try:
        importlib.import_module(f"llmopt.cli.{_name}")
    except ModuleNotFoundError as _e:  # a command whose module is not written yet
        if _e.name != f"llmopt.cli.{_name}":
            raise


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point with exit codes scripts can trust."""
    received: list[int] = []
    previous = _catch_signals(received)
    try:
        sys.exit(_run(argv, received))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _catch_signals(received: list[int]) -> dict:
    """SIGINT and SIGTERM both unwind as KeyboardInterrupt, so every atomic output cleans up after itself."""
    def unwind(signum: int, frame) -> None:  # noqa: ANN001
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, unwind) for s in (signal.SIGINT, signal.SIGTERM)}


def _run(argv: list[str] | None, received: list[int]) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmopt draws its own; transformers' bars would interleave
    hf_logging.set_verbosity_error()
    take_discarded()
    try:
        code = app(args=argv, standalone_mode=False, prog_name="llmopt")
    except typer.Exit as e:
        code = e.exit_code
    except typer.TyperException as e:   # bad flags, missing arguments: typer's usage errors
        e.show()
        return 2
    except (Interrupted, KeyboardInterrupt, typer.Abort):
        signum = received[0] if received else signal.SIGINT
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        removed = "".join(f"; removed the unfinished output {escape(str(p))}" for p in take_discarded())
        err_console.print(f"[red]interrupted[/red] by {name}{removed}", highlight=False, soft_wrap=True)
        return 128 + signum
    except UserError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback on request
        if os.environ.get("LLMOPT_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {type(e).__name__}: {escape(str(e))} "
                          "(set LLMOPT_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        return 1
    if code == 130 and received:   # a command that handled the interrupt itself (distill keeps its best)
        return 128 + received[0]
    return code if isinstance(code, int) else 0


__all__ = ["app", "main", "typer"]
