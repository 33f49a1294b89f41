"""Writing outputs so that a crash, a full disk, Ctrl-C or SIGTERM never leaves a half-written directory.

Everything is written into a temporary sibling (`.NAME.tmp-PID`) and renamed into place at the
end. `llmopt.json` beside the weights records what produced them: source model, the command and
its parameters, versions, wall time and any metrics measured. Nothing a user owns is replaced:
--force replaces only a directory holding `llmopt.json` (an earlier output) or an empty folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from llmopt.errors import UserError

PROVENANCE = "llmopt.json"
FORCE_RULE = "--force replaces only an earlier llmopt output or an empty folder"
_discarded: list[Path] = []   # unfinished outputs removed by an interrupted atomic_output (read by the CLI)


def check_output(out: str | Path, force: bool) -> Path:
    """Fail early (before any work, creating nothing) when OUT may not or cannot be written."""
    path = Path(out).expanduser()
    _refuse_enclosing_cwd(path)
    _clear_stale_siblings(path)
    if os.path.lexists(path):
        _check_replaceable(path, force)
    check_writable(path)
    return path


def _refuse_enclosing_cwd(path: Path) -> None:
    """Replacing the folder one stands in fails (EBUSY) only after all the work; refuse it first."""
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:   # the current folder was deleted: nothing to protect
        return
    target = path.resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"output {path} contains the current folder {cwd}", hint="choose an output elsewhere")


def _check_replaceable(path: Path, force: bool) -> None:
    """Only an earlier llmopt output (a folder with llmopt.json) or an empty folder may be replaced."""
    if path.is_dir():   # a symlink to a folder counts: replacing it renames the link, not its target
        if not (path / PROVENANCE).is_file() and any(path.iterdir()):
            raise UserError(f"output {path} already exists and is not an earlier llmopt output (it holds other "
                            "files)", hint=f"choose another output; {FORCE_RULE}")
        if not force:
            raise UserError(f"output {path} already exists", hint="pass --force to replace it")
        return
    kind = "is a file" if path.is_file() else "is not a folder"
    raise UserError(f"output {path} already exists and {kind}", hint=f"choose another output; {FORCE_RULE}")


def check_writable(path: str | Path) -> None:
    """Raise UserError if an output at `path` could not be created: probe by making (and removing) its
    temporary sibling in the nearest existing folder, so a read-only or missing place fails before the work."""
    path = Path(path).expanduser().absolute()
    first, ancestor = path, path.parent
    while not os.path.lexists(ancestor):
        first, ancestor = ancestor, ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create output {path}: {ancestor} is not a folder", hint="choose another output")
    probe = ancestor / f".{first.name}.tmp-{os.getpid()}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except FileExistsError:
        pass   # this process already holds that sibling, so the folder takes new entries
    except OSError as e:
        raise UserError(f"cannot write output {path}: {e.strerror or e} in {ancestor}",
                        hint="choose a writable output folder") from e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True   # exists, owned by someone else
    return True


def _clear_stale_siblings(path: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` left by a process killed outright (SIGKILL, power loss);
    an earlier output that such a run had renamed aside (`.old`) is put back first."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-(\d+)")
    stale = [(m.group(1), p) for p in parent.iterdir()
             if (m := pattern.fullmatch(p.name)) and not _alive(int(m.group(2)))]
    for kind, p in sorted(stale, key=lambda s: s[0] != "old"):
        if kind == "old" and not os.path.lexists(path):
            p.rename(path)
        else:
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while renaming or cleaning up, then deliver them: no half-done commit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in caught}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if pending:
            signal.raise_signal(pending[0])


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create the missing folders above an output, recording each in `created` (outermost first)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        f.mkdir()
        created.append(f)


def _commit(tmp: Path, path: Path) -> None:
    old = None
    try:
        if os.path.lexists(path):
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            old.rename(path)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_output(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to OUT only if the block completes.

    Otherwise the sibling and any parent folders created for it are removed (also on Ctrl-C/SIGTERM)."""
    path = check_output(out, force)
    created: list[Path] = []
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    committed = False
    try:
        _make_parents(path.absolute().parent, created)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        with _signals_deferred():
            _commit(tmp, path)
            committed = True
    except BaseException as e:
        if not committed:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
                for folder in reversed(created):
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                if isinstance(e, KeyboardInterrupt) and not tmp.exists():
                    _discarded.append(path)
        raise


def check_output_file(out: str | Path, force: bool, replaceable: Callable[[Path], bool]) -> Path:
    """`check_output` for a single-file output: an existing OUT is replaced only with --force and only when
    `replaceable(OUT)` recognises it as an earlier llmopt output."""
    path = Path(out).expanduser()
    _clear_stale_siblings(path)
    if os.path.lexists(path):
        if not path.is_file():
            raise UserError(f"output {path} already exists and is not a file", hint="choose another output")
        if not replaceable(path):
            raise UserError(f"output {path} already exists and is not an earlier llmopt output",
                            hint="choose another output; --force replaces only an earlier llmopt output")
        if not force:
            raise UserError(f"output {path} already exists", hint="pass --force to replace it")
    check_writable(path)
    return path


@contextmanager
def atomic_file(out: str | Path, force: bool, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary sibling file path; rename it to OUT only if the block completes (see `atomic_output`)."""
    path = check_output_file(out, force, replaceable)
    created: list[Path] = []
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    committed = False
    try:
        _make_parents(path.absolute().parent, created)
        tmp.unlink(missing_ok=True)
        yield tmp
        with _signals_deferred():
            os.replace(tmp, path)
            committed = True
    except BaseException as e:
        if not committed:
            with _signals_deferred():
                tmp.unlink(missing_ok=True)
                for folder in reversed(created):
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                if isinstance(e, KeyboardInterrupt):
                    _discarded.append(path)
        raise


def take_discarded() -> list[Path]:
    """The unfinished outputs removed since the last call (for the CLI's interrupted message)."""
    taken = list(_discarded)
    _discarded.clear()
    return taken


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
