"""Evaluation results that survive preemption: one JSON line per finished example, tied to the arguments.

    results = Results(out, "passkey", arguments)   # refuses an --out that holds another evaluation's results
    done = results.open()                          # {key: row} of the examples finished by earlier runs
    results.append(rows)                           # after each batch: written and fsynced before the next

`TASK.jsonl` holds the rows, `TASK.args.json` the arguments that decide them. A rerun with the same arguments
skips the finished examples; a run killed while writing leaves at most a torn last line, which is dropped. Only
process 0 reads and writes (the others get an empty `done` and write nothing; `finished_mask` shares process
0's view with every process).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cream_jax.errors import CreamError


class ResultsError(CreamError, ValueError):
    """An --out that holds results of a different evaluation."""


class Results:
    def __init__(self, out: Path, task: str, arguments: dict[str, Any]):
        self.rows_path, self.args_path = out / f"{task}.jsonl", out / f"{task}.args.json"
        self.arguments = arguments
        self.lead = jax.process_index() == 0

    def open(self) -> dict[int, dict]:
        """The rows finished so far, by key; refuses results of other arguments. Writes the arguments file."""
        if not self.lead:
            return {}
        done = self._read()
        if done and self.args_path.exists():
            before = json.loads(self.args_path.read_text())
            changed = sorted(k for k in {*before, *self.arguments} if before.get(k) != self.arguments.get(k))
            if changed:
                what = ", ".join(f"--{k}={before.get(k)!r} there, {self.arguments.get(k)!r} here" for k in changed[:3])
                raise ResultsError(f"{self.rows_path} holds {len(done)} results of another evaluation ({what}); "
                                   f"rerun with the same arguments to finish it, or choose another --out")
        self.rows_path.parent.mkdir(parents=True, exist_ok=True)
        if not done:
            self.rows_path.write_text("")
        self.args_path.write_text(json.dumps(self.arguments, indent=1) + "\n")
        return done

    def _read(self) -> dict[int, dict]:
        if not self.rows_path.exists():
            return {}
        done, good = {}, 0
        with open(self.rows_path, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a torn last line: the run was killed while writing it
                    break
                done[row["key"]] = row
                good += len(line)
        if good != self.rows_path.stat().st_size:
            with open(self.rows_path, "r+b") as f:
                f.truncate(good)
        return done

    def append(self, rows: Iterable[dict]) -> None:
        if not self.lead:
            return
        text = "".join(json.dumps(r) + "\n" for r in rows)
        with open(self.rows_path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def finished_mask(done: dict[int, dict], count: int) -> np.ndarray:
    """[count] bool: which keys process 0 has finished, the same on every process."""
    mask = np.zeros(count, bool)
    mask[[k for k in done if k < count]] = True
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return mask


def ordered(done: dict[int, dict], keys: Sequence[int]) -> list[dict]:
    """The rows of `keys`, in that order, without their keys."""
    return [{k: v for k, v in done[key].items() if k != "key"} for key in keys]
