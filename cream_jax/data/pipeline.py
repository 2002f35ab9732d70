"""Rows for the train step: packed or one document per row; per host; deterministic; resumable exactly.

Each host turns its token cache (`cache.py`) into an endless stream of rows of
`row_len` tokens. Every row is addressable by its index alone, so the stream
needs no buffers and its state is one integer:

- packing="packed": epoch e concatenates the host's documents in a seeded
  random order and cuts the result into rows (a long document spans several
  rows, windowed at row boundaries); the rows of the epoch are then emitted in
  a second seeded random order. `segment_ids` number the document pieces of a
  row 1, 2, ... (0 = padding, only at the end of an epoch's last row); the
  model never attends across them and no piece predicts another's tokens.
- packing="document": each document is cut into windows of `row_len` tokens
  (windows shorter than `min_len` are dropped); each row is one window, padded,
  in a seeded random order per epoch.
- content="offsets" (CREAM's reference content): document rows of up to
  L = target_length tokens of one document, and `doc_lengths` = the window's
  true length n, which the sampler needs to place head, middle and tail.

A batch for step s is rows [s R, (s + 1) R) of the host's stream, R the rows
this host feeds (its share of the global batch). `Batches` prefetches them on
a background thread; `state()` is {"step": next step, "fingerprint": ...} and
`Batches(..., state=...)` continues with exactly the same batches.
Deterministic given (seed, host split): a run with a different number of hosts
sees the documents in a different order.
"""

from __future__ import annotations

import dataclasses
import queue
from pathlib import Path
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from cream_jax.data.cache import TokenCache
from cream_jax.data.sources import DataError

if TYPE_CHECKING:
    import ml_collections

PACKINGS = ("packed", "document")
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Layout:
    row_len: int
    packing: str = "packed"
    min_len: int = 2  # document rows: shortest window kept (offsets: the window N)
    offsets: bool = False  # emit doc_lengths (document rows of one document each)

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise DataError(f"unknown packing {self.packing!r}; allowed: {', '.join(PACKINGS)}")
        if self.offsets and self.packing != "document":
            raise DataError("content='offsets' needs one document per row: set data.packing='document'")
        if not 1 <= self.min_len <= self.row_len:
            raise DataError(f"min_len={self.min_len} must be in [1, row_len={self.row_len}]")


class Rows:
    """One host's endless stream of rows; `rows(start, n)` is a pure function of the cache, layout and seed."""

    def __init__(self, cache: TokenCache, layout: Layout, seed: int, drop_short: bool = False):
        self.cache, self.layout, self.seed = cache, layout, seed
        lengths = cache.lengths
        host = cache.meta.get("host", 0)
        self._host = host
        if cache.num_tokens == 0:
            raise DataError(f"the corpus {cache.meta['source']} has no tokens (host {host})")
        if layout.packing == "document":
            short = lengths < layout.min_len
            if layout.offsets and short.any() and not drop_short:
                raise DataError(
                    f"{int(short.sum())} of {len(lengths)} documents (host {host}) are shorter than the window "
                    f"N={layout.min_len} that CREAM's content='offsets' needs (shortest: {int(lengths.min())} "
                    f"tokens). Set data.drop_short=True to skip them, or use positions.content='contiguous'.")
            docs, starts = [], []
            for d, n in enumerate(lengths):
                for s in range(0, int(n), layout.row_len):
                    if n - s >= layout.min_len:
                        docs.append(d)
                        starts.append(s)
            if not docs:
                raise DataError(f"no document of the corpus {cache.meta['source']} (host {host}) has "
                                f"{layout.min_len} tokens (longest: {int(lengths.max())})")
            self.win_doc, self.win_start = np.asarray(docs, np.int64), np.asarray(starts, np.int64)
            self.win_len = np.minimum(lengths[self.win_doc] - self.win_start, layout.row_len)
            self.rows_per_epoch = len(docs)
        else:
            self.rows_per_epoch = -(-cache.num_tokens // layout.row_len)
        self._epochs: dict[int, Any] = {}

    def _rng(self, epoch: int, what: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self._host, epoch, what))

    def _epoch(self, e: int):
        if e not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            order = self._rng(e, 0).permutation(self.rows_per_epoch)
            if self.layout.packing == "packed":
                docs = self._rng(e, 1).permutation(self.cache.num_docs)
                cum = np.concatenate([[0], np.cumsum(self.cache.lengths[docs])])
                self._epochs[e] = (order, docs, cum)
            else:
                self._epochs[e] = (order,)
        return self._epochs[e]

    def _fill(self, out: dict, i: int, pieces: list[tuple[int, int, int]]) -> None:
        """Write pieces (doc, start, length) one after another into row i."""
        c, at = self.cache, 0
        for seg, (d, s, n) in enumerate(pieces, 1):
            lo = int(c.starts[d]) + s
            out["tokens"][i, at:at + n] = c.tokens[lo:lo + n]
            out["weights"][i, at:at + n] = 1.0 if c.weights is None else c.weights[lo:lo + n]
            out["segment_ids"][i, at:at + n] = seg
            at += n

    def rows(self, start: int, n: int) -> dict[str, np.ndarray]:
        T = self.layout.row_len
        out = {"tokens": np.zeros((n, T), np.int32), "weights": np.zeros((n, T), np.float32),
               "segment_ids": np.zeros((n, T), np.int32)}
        if self.layout.offsets:
            out["doc_lengths"] = np.zeros((n,), np.int32)
        for i, k in enumerate(range(start, start + n)):
            epoch, r = divmod(k, self.rows_per_epoch)
            parts = self._epoch(epoch)
            r = int(parts[0][r])
            if self.layout.packing == "document":
                n_tok = int(self.win_len[r])
                self._fill(out, i, [(int(self.win_doc[r]), int(self.win_start[r]), n_tok)])
                if self.layout.offsets:
                    out["doc_lengths"][i] = n_tok
                continue
            _, docs, cum = parts
            lo, hi = r * T, min((r + 1) * T, int(cum[-1]))
            j, pieces = int(np.searchsorted(cum, lo, side="right")) - 1, []
            while lo < hi:
                take = min(hi, int(cum[j + 1])) - lo
                pieces.append((int(docs[j]), lo - int(cum[j]), take))
                lo += take
                j += 1
            self._fill(out, i, pieces)
        return out


class _StepStream:
    """What both batch sources share: the step of the next batch, and a state that restores it."""

    fingerprint: str
    step: int

    def _check_state(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state version {state.get('version')} != {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint:
            raise DataError(f"the data iterator state belongs to another dataset or layout "
                            f"({state.get('fingerprint')!r}, this one is {self.fingerprint!r}); resuming would "
                            f"not continue the same batches. Local files count by content, in order, so an "
                            f"edited, added or reordered data file is another dataset: point data.files at the "
                            f"files the run was started on")

    def state(self) -> dict:
        """Where the next batch starts; small and JSON-serialisable."""
        return {"version": STATE_VERSION, "step": self.step, "fingerprint": self.fingerprint}

    def restore(self, state: dict) -> None:
        """Continue from `state` (from `state()`, e.g. out of a checkpoint)."""
        self._check_state(state)
        self.step = int(state["step"])

    def __iter__(self):
        return self


class Batches(_StepStream):
    """This host's batches, step after step, computed ahead on a background thread."""

    def __init__(self, rows: Rows, rows_per_step: int, *, fingerprint: str = "", state: dict | None = None,
                 prefetch: int = 2):
        self.rows, self.rows_per_step, self.fingerprint, self.prefetch = rows, rows_per_step, fingerprint, prefetch
        self.step = 0
        if state is not None:
            self._check_state(state)
            self.step = int(state["step"])
        self._thread = None
        self._start()

    def _start(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        self._stop = threading.Event()
        if self.prefetch > 0:
            self._thread = threading.Thread(target=self._produce, args=(self.step,), daemon=True)
            self._thread.start()

    def restore(self, state: dict) -> None:
        self.close()
        super().restore(state)
        self._start()

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.rows.rows(step * self.rows_per_step, self.rows_per_step)

    def _produce(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                item = (step, self.batch(step))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1
        except BaseException as e:  # surface errors in the consumer
            self._queue.put((None, e))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._thread is None:
            out = self.batch(self.step)
        else:
            step, out = self._queue.get()
            if step is None:
                raise out
            assert step == self.step, (step, self.step)
        self.step += 1
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- from a train config


class SyntheticBatches(_StepStream):
    """The synthetic Markov source (`data.source="synthetic_markov"`) behind the same interface."""

    def __init__(self, source, rows: slice, row_len: int, *, fingerprint: str, state: dict | None = None):
        self.source, self.host_rows, self.row_len, self.fingerprint = source, rows, row_len, fingerprint
        self.step = 0
        if state is not None:
            self._check_state(state)
            self.step = int(state["step"])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        tokens = self.source.rows(step, self.host_rows, self.row_len)
        return {"tokens": tokens, "weights": np.ones(tokens.shape, np.float32)}

    def __next__(self):
        out = self.batch(self.step)
        self.step += 1
        return out

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Data:
    batches: Batches | SyntheticBatches
    description: str
    keys: tuple[str, ...]  # the batch's arrays: tokens, weights[, segment_ids][, doc_lengths]


class _Texts:
    """A TFDS data source seen as a sequence of document strings."""

    def __init__(self, source, text_key: str):
        from cream_jax.data.sources import document_text

        self.source, self.text_key, self._text = source, text_key, document_text

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> str:
        return self._text(self.source[i], self.text_key)


SOURCES = ("synthetic_markov", "corpus", "files", "tfds")
FORMATS = ("text", "chat")


def batch_keys(source: str, offsets: bool) -> tuple[str, ...]:
    """The arrays of each batch that a `data.source` produces (`offsets`: rows carry their documents' lengths)."""
    if source == "synthetic_markov":
        return ("tokens", "weights")
    return ("tokens", "weights", "segment_ids") + (("doc_lengths",) if offsets else ())


def check(d: ml_collections.ConfigDict, offsets: bool) -> None:
    """The data config's checks (before anything is read or compiled); `offsets`: rows hold one document each."""
    for name, value, allowed in (("source", d.source, SOURCES), ("format", d.format, FORMATS),
                                 ("packing", d.packing, PACKINGS)):
        if value not in allowed:
            raise DataError(f"data.{name}={value!r} is not one of {allowed}.")
    if d.source in ("corpus", "tfds") and not d.name:
        raise DataError(f"data.source={d.source!r} needs data.name (a {'corpus' if d.source == 'corpus' else 'TFDS'} "
                        "name, e.g. 'austen' or 'pg19').")
    if d.source == "files" and not d.files:
        raise DataError("data.source='files' needs data.files (comma-separated .txt/.jsonl paths).")
    if offsets and d.source != "synthetic_markov" and d.packing != "document":
        raise DataError("positions.content='offsets' reads one document per row: set data.packing='document'.")
    if d.format == "chat" and d.source == "synthetic_markov":
        raise DataError("data.format='chat' needs a real source (data.source='files' with chat jsonl).")


def from_config(c: ml_collections.ConfigDict, model_vocab_size: int, *, row_len: int, rows: slice, window: int,
                offsets: bool, host: int = 0, num_hosts: int = 1, state: dict | None = None,
                progress: bool = True) -> Data:
    """The host's batches for a train config (`c.data`); every check on the data happens here, before training."""
    import hashlib

    from cream_jax.data import cache as cache_lib
    from cream_jax.data import corpora, sources
    from cream_jax.data import tokenizer as tok_lib

    d = c.data
    check(d, offsets)
    keys = batch_keys(d.source, offsets)
    rows_per_step = rows.stop - rows.start
    if d.source == "synthetic_markov":
        from cream_jax.data.synthetic import MarkovSource

        source = MarkovSource(model_vocab_size, d.branching, seed=c.seed)
        desc = (f"synthetic Markov source (unigram entropy {source.unigram_entropy():.3f}, entropy rate "
                f"{source.conditional_entropy():.3f} nats)")
        fp = f"synthetic:{model_vocab_size}:{d.branching}:{c.seed}:{row_len}:{rows.start}-{rows.stop}"
        return Data(SyntheticBatches(source, rows, row_len, fingerprint=fp, state=state), desc, keys)

    root = corpora.cache_root(d.cache_dir or None)
    spec = d.tokenizer
    if not spec and c.model.init_from and (Path(c.model.init_from) / "tokenizer.model").exists():
        spec = c.model.init_from  # the model's own tokenizer
    tok = tok_lib.resolve(spec, d.cache_dir or None)
    tok_lib.check_vocab(tok, model_vocab_size)
    layout = Layout(row_len=row_len, packing=d.packing, min_len=window if offsets else 2, offsets=offsets)
    chat = d.format == "chat"
    if d.source == "tfds":
        documents = _Texts(sources.open_tfds(d.name, d.data_dir or None, d.split), d.text_key)
        source_id = f"tfds:{d.name}:{d.split}:{d.data_dir}:{d.text_key}"
        label = f"TFDS {d.name} ({d.split})"
    else:
        spec = d.name if d.source == "corpus" else d.files
        if d.source == "corpus" and (not spec or corpora.get_asset(spec).kind != "corpus"):
            raise DataError(f"data.name={spec!r} is not a corpus; known: "
                            + ", ".join(n for n, a in corpora.ASSETS.items() if a.kind == "corpus"))
        paths = sources.resolve_files(spec, d.cache_dir or None)
        name, data_dir = sources.build_tfds(paths, d.data_dir or root / "tfds", text_key=d.text_key, chat=chat)
        documents = _Texts(sources.open_tfds(name, data_dir, "train"), "text")
        source_id = f"tfds:{name}"
        label = f"{d.source} {spec} (TFDS {name})"
    cache = cache_lib.build(documents, tok, root / "tokens", source_id=source_id, chat=chat, host=host,
                            num_hosts=num_hosts, progress=progress)
    stream = Rows(cache, layout, seed=c.seed, drop_short=d.drop_short)
    fp = hashlib.sha256(f"{cache.path.name}|{layout}|{c.seed}|{rows_per_step}|{d.drop_short}".encode()).hexdigest()[:16]
    batches = Batches(stream, rows_per_step, fingerprint=fp, state=state, prefetch=d.prefetch)
    desc = (f"{label}: host {host}/{num_hosts} has {cache.num_docs} documents, {cache.num_tokens} tokens; "
            f"{d.packing} rows of {row_len}, {stream.rows_per_epoch} rows per epoch; tokenizer {tok.path.name} "
            f"({tok.vocab_size} pieces)")
    return Data(batches, desc, keys)
