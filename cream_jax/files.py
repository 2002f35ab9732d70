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
    usual_mode(tmp)
    try:
        yield tmp
        try:
            (tmp / built).rename(final)
        except OSError:  # built meanwhile by another process
            if not (final / done_marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    try:  # Linux: read it, rather than set and reset the process-wide mask under running threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(path: Path) -> None:
    """Give `path` the permissions that mkdir or open would (mkdtemp and safetensors make theirs private)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def replaced_dir(final: Path) -> Iterator[Path]:
    """Yields a new temporary directory beside `final` to build in; on success it takes `final`'s place
    whole (an existing `final` is moved aside, then deleted). A failure leaves `final` as it was and
    nothing beside it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    usual_mode(tmp)
    try:
        yield tmp
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}-old-", dir=final.parent)) if final.exists() else None
        if old is not None:
            final.rename(old / final.name)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
