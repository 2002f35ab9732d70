"""Documents: from local .txt/.jsonl files, stored once as an array_record TFDS dataset, or any TFDS dataset.

A document is one string: a whole .txt file, or one jsonl line's `text_key`
field. Chat (SFT) jsonl lines hold {"messages": [{"role", "content"}, ...]};
the document is then that list as JSON text (`format="chat"`).

Local files become a TFDS dataset (a generator-based builder writing array_record
files, built once per content) read back through `tfds.data_source`, the same random-access
path as a prepared TFDS dataset such as pg19 (`source="tfds"`, `name="pg19"`,
`text_key="book_text"`, `data_dir="gs://..."`). Neither path needs TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from cream_jax import files
from cream_jax.errors import CreamError

SUFFIXES = (".txt", ".jsonl")


class DataError(CreamError, ValueError):
    """Input data that cannot be used as asked."""


def resolve_files(spec: str | Sequence[str], cache_dir: str | None = None) -> list[Path]:
    """Comma-separated paths (or a list); a name from `corpora` stands for its fetched documents.jsonl."""
    from cream_jax.data import corpora

    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise DataError("no input files given (data.files is empty)")
    paths = []
    for item in items:
        if item in corpora.ASSETS and not Path(item).exists():
            if corpora.ASSETS[item].kind != "corpus":
                raise DataError(f"{item!r} is a tokenizer, not a corpus")
            paths.append(corpora.fetch(item, cache_dir))
            continue
        path = Path(item).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: only {' and '.join(SUFFIXES)} files are read (one document per .txt file, "
                            f"one per .jsonl line)")
        paths.append(path)
    return paths


def read_documents(paths: Sequence[Path], text_key: str = "text", chat: bool = False) -> Iterator[str]:
    for path in paths:
        if path.suffix == ".txt":
            if chat:
                raise DataError(f"{path}: chat data must be jsonl with a 'messages' list per line")
            yield path.read_text(encoding="utf-8", errors="replace")
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e})") from e
                key = "messages" if chat else text_key
                if not isinstance(obj, dict) or key not in obj:
                    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise DataError(f"{path}:{n}: no {key!r} field (found: {found}); set data.text_key"
                                    + ("" if chat else " or data.format='chat'"))
                yield json.dumps(obj[key], ensure_ascii=False) if chat else str(obj[key])


def files_fingerprint(paths: Sequence[Path], text_key: str, chat: bool) -> str:
    """The files' contents in order, and their suffixes (which decide how each is read), not where they lie:
    a run folder copied or moved with its data resumes on the same dataset."""
    h = hashlib.sha256(f"{text_key}|{chat}".encode())
    for p in paths:
        h.update(f"|{p.suffix.lower()}|".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_tfds(paths: Sequence[Path], data_dir: str | os.PathLike, *, text_key: str = "text",
               chat: bool = False) -> tuple[str, str]:
    """Store the documents of local files as a TFDS dataset (array_record) under data_dir, once per content.

    Returns (dataset name, data_dir) for `tfds.data_source`."""
    import tensorflow_datasets as tfds

    name = f"cream_local_{files_fingerprint(paths, text_key, chat)}"
    data_dir = str(data_dir)
    if (Path(data_dir) / name / "1.0.0" / "dataset_info.json").exists():  # TFDS writes it last
        return name, data_dir
    texts = list(read_documents(paths, text_key=text_key, chat=chat))
    if not texts or not any(t.strip() for t in texts):
        raise DataError(f"no documents with text in {', '.join(map(str, paths))}")
    description = f"cream-jax documents from {', '.join(p.name for p in paths)}"

    # A builder of our own rather than tfds.dataset_builders.store_as_tfds_dataset, whose split generator
    # imports TensorFlow to test for tf.data inputs.
    class LocalDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(description=description, disable_shuffling=True,
                                                  features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, text in enumerate(texts):
                yield i, {"text": text}

    LocalDocuments.name = name
    # Built in a private directory and moved into place whole: processes that share data_dir (test workers,
    # hosts on one file system) may build the same dataset at once, and TFDS's own final rename fails for all
    # but the first of them.
    final = Path(data_dir) / name / "1.0.0"
    with files.build_dir(final, "dataset_info.json", built=f"{name}/1.0.0") as tmp:
        LocalDocuments(data_dir=str(tmp), file_format="array_record").download_and_prepare()
    return name, data_dir


def open_tfds(name: str, data_dir: str | None, split: str = "train") -> Sequence[dict]:
    """A random-access TFDS source (len() and [i]) of a prepared array_record dataset."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a missing dataset/split
        raise DataError(f"cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: {e}. "
                        f"Prepare it (array_record format) first, e.g. `tfds build {name} --file_format=array_record "
                        f"--data_dir=...` on a machine with TensorFlow.") from e


def document_text(example: dict, text_key: str) -> str:
    if text_key not in example:
        raise DataError(f"the TFDS examples have no {text_key!r} feature (features: {sorted(example)}); "
                        f"set data.text_key")
    value = example[text_key]
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
