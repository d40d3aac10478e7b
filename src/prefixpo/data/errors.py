"""Errors about user data: every message names the source, the row, the column and the fix.

``DataError`` is what the user sees (a ``ValueError``); a bad data config key raises one of its two
kinds, ``BadDataValue`` (naming the field) or ``UnknownDataKey``. ``RowError`` is raised inside the row
pipeline and turned into a ``BadRow`` record, which becomes a ``DataError`` under
``on_bad_row="error"`` or a counted skip under ``on_bad_row="skip"``.
"""

from __future__ import annotations

from dataclasses import dataclass


class DataError(ValueError):
    """A problem with the dataset or the data config, explained for the user."""


class BadDataValue(DataError):
    """A ``DataConfig`` value refused; ``field`` names the field (a mixture names the key path from it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class UnknownDataKey(DataError):
    """A key ``DataConfig`` does not have; the message suggests the closest one."""


class RowError(Exception):
    """One row cannot be used: ``kind`` is a short category, ``reason`` says why, ``fix`` what to do."""

    def __init__(self, kind: str, column: str, reason: str, fix: str = ""):
        super().__init__(reason)
        self.kind, self.column, self.reason, self.fix = kind, column, reason, fix


@dataclass(frozen=True)
class BadRow:
    """A row that was not used. ``row`` is 1-based in the source (the line number for JSON lines).

    >>> str(BadRow(7, "empty", "chosen", "chosen is empty", "remove the row"))
    'row 7, column chosen: chosen is empty (remove the row)'
    """

    row: int
    kind: str
    column: str
    reason: str
    fix: str = ""

    def __str__(self) -> str:
        return self.describe()

    def describe(self, unit: str = "row") -> str:
        """``unit`` is ``"line"`` for JSON lines files, where the row number is the line number."""
        fix = f" ({self.fix})" if self.fix else ""
        return f"{unit} {self.row}, column {self.column}: {self.reason}{fix}"


def bad_row_error(source: str, bad: BadRow, total_bad: int, unit: str = "row") -> DataError:
    """The error raised for the first bad row under ``on_bad_row="error"``.

    >>> str(bad_row_error("d.jsonl", BadRow(3, "identical", "chosen", "same text"), 2)).split(". ")[0]
    'd.jsonl: row 3, column chosen: same text; 1 more bad rows in this dataset'
    """
    more = f"; {total_bad - 1} more bad rows in this dataset" if total_bad > 1 else ""
    return DataError(f"{source}: {bad.describe(unit)}{more}. Fix the data, or pass on_bad_row='skip' "
                     f"(--on-bad-row skip) to skip bad rows and report them.")
