"""Writing outputs so that a crash, a full disk or Ctrl-C never leaves a half-written directory.

Everything is written into a temporary sibling (`.NAME.tmp-PID`) and renamed into place at the
end. `llmopt.json` beside the weights records what produced them: source model, the command and
its parameters, versions, wall time and any metrics measured.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterator

from llmopt.errors import UserError

PROVENANCE = "llmopt.json"


def check_output(out: str | Path, force: bool) -> Path:
    """Fail early (before any work) when OUT exists and --force was not given."""
    path = Path(out).expanduser()
    if path.exists() and not force:
        raise UserError(f"output {path} already exists", hint="pass --force to overwrite it")
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    parent = path.absolute().parent
    if not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to OUT only if the block completes."""
    path = check_output(out, force)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None   # NaN and infinities are not JSON
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def versions() -> dict:
    import torch
    import transformers

    import llmopt

    return {"llmopt": llmopt.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def provenance(command: str, source: str, parameters: Any, started: float, metrics: dict | None = None,
               **extra: Any) -> dict:
    """The llmopt.json record for an output produced by `command` from `source`."""
    record = {
        "llmopt_format": 1,
        "command": command,
        "argv": sys.argv,
        "source_model": source,
        "parameters": _jsonable(parameters),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": round(time.time() - started, 3),
        "metrics": _jsonable(metrics or {}),
    }
    record.update(_jsonable(extra))
    return record


def write_provenance(directory: Path, record: dict) -> None:
    (directory / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")


def read_provenance(directory: str | Path) -> dict | None:
    f = Path(directory) / PROVENANCE
    return json.loads(f.read_text()) if f.is_file() else None


def save_pretrained(model, tokenizer, out: str | Path, force: bool, record: dict) -> Path:
    """Save a transformers model + tokenizer + llmopt.json atomically; return OUT."""
    with atomic_output(out, force) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_provenance(tmp, record)
    return Path(out)


def dir_size(path: str | Path) -> int:
    """Bytes on disk of a model directory (weights, config, tokenizer)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
