"""Directories built whole or not at all: build in a private temporary directory, then rename into place."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def build_dir(final: Path, done_marker: str, built: str = "") -> Iterator[Path]:
    """Yields a new temporary directory beside `final` to build in; on success, `tmp / built` (the
    directory itself when `built` is "") is renamed to `final`. A failure leaves nothing behind. Processes
    that share the parent (test workers, hosts on one file system) may build the same thing at once: the
    first rename wins, and a later one is dropped when `final / done_marker` exists."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        try:
            (tmp / built).rename(final)
        except OSError:  # built meanwhile by another process
            if not (final / done_marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
