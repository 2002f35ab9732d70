"""Results as people read them: the one markdown-table writer that every CLI's report uses."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: the header, its rule, one line per row (cells as `str` gives them)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
