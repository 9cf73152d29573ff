"""What a search ended with: how many trials completed, and each distinct trial error in one line."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["error_line", "SearchOutcome"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?:\([^)]*\))?: \S")


def error_line(err: BaseException) -> str:
    """One line for a trial's error: the innermost exception's last ``Type: message`` line (Tune and
    Train wrap the trial's own error, with tracebacks, in theirs)."""
    inner = getattr(err, "cause", None) or err
    while inner.__cause__ is not None:
        inner = inner.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(inner)).splitlines() if line.strip()]
    typed = [line for line in lines if _EXCEPTION_LINE.match(line)]
    if typed:
        return typed[-1]
    return f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__


@dataclass
class SearchOutcome:
    """Trials that completed (trained to the end) and the errors of those that failed, by message."""

    completed: int
    errors: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, completed: int, errors: Iterable[BaseException]) -> "SearchOutcome":
        return cls(completed, Counter(error_line(err) for err in errors))

    @property
    def errored(self) -> int:
        return sum(self.errors.values())

    def error_lines(self) -> list[str]:
        """``<n> trial(s): <message>``, most frequent first."""
        return [f"{n} trial{'s' if n > 1 else ''}: {message}" for message, n in self.errors.most_common()]

    def markdown(self) -> str:
        """The errors as a section of the search's results table."""
        if not self.errors:
            return ""
        rows = "\n".join(f"| {n} | {message.replace('|', '/')} |" for message, n in self.errors.most_common())
        return f"\n## Trial errors\n\n| trials | error |\n|---|---|\n{rows}\n"
