"""Results as people read them: the one markdown-table writer and the one JSON + markdown page writer
that the benchmarks' reports use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table: the header, its rule, one line per row (cells as `str` gives them)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def write_report(folder: str | Path, name: str, result: Any, markdown: str) -> tuple[Path, Path]:
    """`result` as `folder/name.json` and `markdown` as `folder/name.md` (the folder made if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    return folder / f"{name}.json", folder / f"{name}.md"
