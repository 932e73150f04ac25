"""Tables that fit the terminal (issue 18): the widest columns are narrowed and their cells
wrapped onto more lines, never a 230-character line; and the product's labels for values
(conversion_done is "Conversion Done", ping_url is "Ping Url")."""

from __future__ import annotations

import csv
import io
import os
import shutil
import textwrap
from collections.abc import Collection, Sequence

GAP = "  "
MIN_WIDTH = 4  # a column is narrowed no further (its words break)
KEEP = 24  # columns this narrow are narrowed only when the long ones cannot give more
DEFAULT_WIDTH = 120  # when the output is not a terminal and $COLUMNS is not set


def label(value: str) -> str:
    """The product's label of a value: `conversion_done` -> `Conversion Done`."""
    return " ".join(word.capitalize() for word in value.replace("-", "_").split("_") if word)


def terminal_width() -> int:
    if os.environ.get("COLUMNS", "").isdigit():
        return max(40, int(os.environ["COLUMNS"]))
    return max(40, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)


def widths_for(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    whole: Collection[int] = (),
) -> list[int]:
    """Column widths that fit `width`: the natural ones, the widest narrowed first; the
    columns of `whole` (ids, which people copy) never narrow."""
    natural = [len(h) for h in headers]
    for row in rows:
        natural = [
            max(w, *(len(line) for line in c.splitlines() or [""]))
            for w, c in zip(natural, row, strict=True)
        ]
    widths = list(natural)
    room = width - len(GAP) * (len(widths) - 1)
    # The long columns first (short ones, such as times and states, stay whole), then down
    # to each header's longest word (headers stay readable), then further.
    words = [max(MIN_WIDTH, min(12, *(len(w) for w in h.split() or [""]))) for h in headers]
    short = [max(f, min(n, KEEP)) for f, n in zip(words, natural, strict=True)]
    lean = [n if n <= KEEP else max(f, 12) for f, n in zip(words, natural, strict=True)]
    phases = [short, lean, words, [MIN_WIDTH] * len(widths)]
    for floors in phases:
        for i in whole:
            floors[i] = natural[i]
    for floors in phases:
        while sum(widths) > room:
            room_left = [i for i in range(len(widths)) if widths[i] > floors[i]]
            if not room_left:
                break
            widest = max(room_left, key=lambda i: widths[i])
            widths[widest] -= 1
    return widths


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None = None,
    whole: Collection[int] = (),
) -> str:
    """Left-aligned columns two spaces apart, a header line first; cells wrapped to fit
    (except the columns of `whole`)."""
    widths = widths_for(headers, rows, width or terminal_width(), whole)
    lines: list[str] = []
    for row in [headers, *rows]:
        cells = [_wrap(cell, w) for cell, w in zip(row, widths, strict=True)]
        for n in range(max(len(c) for c in cells)):
            parts = [
                (c[n] if n < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


def _wrap(cell: str, width: int) -> list[str]:
    out: list[str] = []
    for line in cell.splitlines() or [""]:
        out.extend(
            textwrap.wrap(line, width, break_long_words=True, break_on_hyphens=False) or [""]
        )
    return out


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")
