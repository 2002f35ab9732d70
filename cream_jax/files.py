"""Output directories: checked before any work, and built whole or not at all (a private temporary
directory, then a rename into place)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from cream_jax.errors import CreamError


class OutputError(CreamError):
    """An output folder that cannot be made or written."""


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path`, checked before any expensive work: a folder that exists or can be made there, and writable.
    Nothing is created; an OutputError names `flag`."""
    path = Path(path)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise OutputError(f"{flag}={path}: cannot write there ({problem}); choose another folder.")
    return path


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
