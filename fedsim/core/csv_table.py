"""Numeric CSV files read row by row, every fault refused in one line naming the file, the line and the column
(system traces, availability windows)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from .errors import FedsimError


def numeric_rows(path: str | Path, columns: tuple[str, ...], what: str) -> Iterator[tuple[int, dict[str, float]]]:
    """``(line, {column: value})`` for every non-blank data row of the CSV at ``path`` whose header names all
    ``columns`` (any order, extra columns ignored). Refuses an unreadable file, a missing column, a missing
    value and a non-number, each in one :class:`FedsimError` line ``"WHAT PATH, line L, column C: ..."``
    (:func:`where` writes the same prefix for the caller's own checks)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise FedsimError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise FedsimError(f"{what} {path}, line 1: missing column(s) {', '.join(missing)} (needs {','.join(columns)})")
    index = {c: header.index(c) for c in columns}
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        values = {}
        for column in columns:
            at = where(what, path, line, column)
            try:
                cell = row[index[column]].strip()
            except IndexError:
                raise FedsimError(f"{at}: missing value") from None
            try:
                values[column] = float(cell)
            except ValueError:
                raise FedsimError(f"{at}: {cell!r} is not a number") from None
        yield line, values


def where(what: str, path: str | Path, line: int, column: str) -> str:
    """``"WHAT PATH, line L, column C"``: the prefix of a one-line error about one cell."""
    return f"{what} {path}, line {line}, column {column}"
