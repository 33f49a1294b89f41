"""Progress reporting through a callback object, so algorithms never print.

Algorithms accept a `Progress` and call `start`/`advance`/`note`; the CLI passes one that
draws rich progress bars, tests and library users get the silent default.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """Silent progress sink; subclass to display."""

    def start(self, description: str, total: int | None = None) -> None:
        """Begin a stage of `total` steps (None when unknown)."""

    def advance(self, steps: int = 1, **info: Any) -> None:
        """Mark `steps` done; `info` carries live figures (loss, error, current module)."""

    def finish(self) -> None:
        """End the current stage."""

    def note(self, message: str) -> None:
        """Something the user should know that is not an error (e.g. raised damping)."""


SILENT = Progress()
