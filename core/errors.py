"""Errors meant for people.

`BadInput` is the one exception type for problems the user can fix: a malformed
dataset record, an unknown config key, a model folder without weights. The CLI
turns it into a one-line message and exit code 2; the web UI shows the same text.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BadInput(Exception):
    """A problem with something the user supplied.

    The message names where the problem is (file, record, field) and what was
    expected, so it can be fixed without reading a traceback.
    """

    def __init__(self, what: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None):
        self.what = what
        self.file = file
        self.record = record
        self.field = field
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.record is not None:
            where.append(f"record {self.record}")
        if self.field:
            where.append(f"field '{self.field}'")
        return (", ".join(where) + ": " if where else "") + self.what

    def __str__(self) -> str:
        return self.message


class Problems(BadInput):
    """Several config problems found at once, so the user can fix them in one go."""

    def __init__(self, problems: list[str], file: str | None = None):
        self.problems = problems
        super().__init__("; ".join(problems) if len(problems) < 2 else
                         "\n  - " + "\n  - ".join(problems), file=file)
