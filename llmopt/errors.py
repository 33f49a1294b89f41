"""One exception type for mistakes the user can fix; the CLI maps it to exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a wrong flag value, a missing model, an unsupported architecture.

    The message is one line that says what is wrong; `hint` says what to do about it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


class MissingExtra(UserError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed",
            hint=f"pip install 'llmopt[{extra}]'",
        )


def require(condition: bool, message: str, hint: str | None = None) -> None:
    """Raise UserError(message) unless condition holds: the one-line validator used by every options class."""
    if not condition:
        raise UserError(message, hint)
