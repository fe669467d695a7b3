"""Errors meant for people.

`BadInput` is the one exception type for problems the user can fix: a malformed
dataset record, an unknown config key, a model folder without weights. The CLI
turns it into a one-line message and exit code 2; the web UI shows the same text.
Anything else is a bug and keeps its traceback.

What went wrong is a `core.i18n.Msg` (an id in the catalogues and its parameters), so
the same error reads in the language of whoever sees it: English on the CLI unless
TUNEBENCH_LANG says otherwise, the visitor's language on the page. A plain string is
still accepted, and shown as it is in every language.
"""

from __future__ import annotations

from .i18n import Bullets, Msg, msg, render, t


class BadInput(Exception):
    """A problem with something the user supplied.

    The message names where the problem is (file, record, field) and what was
    expected, so it can be fixed without reading a traceback.
    """

    def __init__(self, what: "str | Msg", *, file: str | None = None,
                 record: int | None = None, field: str | None = None):
        self.what = what
        self.file = file
        self.record = record
        self.field = field
        super().__init__(self.text("en"))

    def text(self, lang: str | None = None) -> str:
        """The whole message, place first, in `lang` (default: the current language)."""
        where = []
        if self.file:
            where.append(t("where.file", lang, file=str(self.file)))
        if self.record is not None:
            where.append(t("where.record", lang, record=self.record))
        if self.field:
            where.append(t("where.field", lang, field=self.field))
        what = render(self.what, lang) if isinstance(self.what, Msg) else str(self.what)
        if not where:
            return what
        return t("where.joined", lang, where=t("where.sep", lang).join(where), what=what)

    @property
    def message(self) -> str:
        return self.text()

    def __str__(self) -> str:
        return self.text()

    def record_of(self) -> dict:
        """Language-neutral form for status.json: the message id, parameters and place."""
        what = self.what if isinstance(self.what, Msg) else msg("text", text=str(self.what))
        found = what.record()
        found.update(file=None if self.file is None else str(self.file), record=self.record,
                     field=self.field)
        return found

    @classmethod
    def from_record(cls, found: dict) -> "BadInput":
        return cls(Msg.from_record(found), file=found.get("file"), record=found.get("record"),
                   field=found.get("field"))

    @classmethod
    def rebuilt(cls, record: dict | None, text: str | None) -> "BadInput":
        """An error that crossed a process or a file: from its language-neutral record when
        there is a readable one, else from its text as written."""
        if record:
            try:
                return cls.from_record(record)
            except (KeyError, TypeError, AttributeError):
                pass  # a record from another version: its text follows
        return cls(text or "")


class Problems(BadInput):
    """Several config problems found at once, so the user can fix them in one go."""

    def __init__(self, problems: "list[str | Msg]", file: str | None = None):
        self.problems = problems
        what = problems[0] if len(problems) == 1 else msg("problems", problems=Bullets(problems))
        super().__init__(what, file=file)
