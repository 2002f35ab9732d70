"""Long-context tasks (SPEC section 5), generated from a seed at an exact token length, and their scorers.

Prompts are assembled from token ids, not strings, so a prompt has exactly the requested number of tokens
(lines and kv fill the part of a record that does not fit with whitespace) and many prompts of one length
batch without padding:
- passkey: filler sentences around the line "The pass key is K. Remember it. K is the pass key." at a depth
  in [0, 1] (at the sentence boundary nearest that fraction of the filler);
- lines (LongChat-Lines): "line <word>-<word>: REGISTER_CONTENT is <NUMBER>" lines, one asked for;
- kv ("Lost in the Middle"): a JSON object of UUID keys and values, the key at a given index asked for;
Each returns an `Example` (token ids, the expected answer, and where the answer sits). Scoring is exact
match on the first number (passkey, lines) or the first UUID (kv) of the greedy continuation.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Callable

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
WORDS = ("apple river stone cloud maple tiger silver candle harbor meadow falcon copper lantern violet "
         "garden pepper quartz saddle timber walnut amber beacon cedar dune ember forest glacier hazel island "
         "jasmine kettle lemon marble nectar orchid pebble quill raven sable thistle umber velvet willow "
         "yarrow zephyr anchor bramble cobalt").split()
TASKS = ("passkey", "lines", "kv")


@dataclasses.dataclass
class Example:
    ids: list[int]  # exactly tok.encode(text) with BOS: the prompt is its text, encoded once
    text: str
    answer: str | list[str]  # RULER's tasks may expect several strings
    meta: dict  # the grid cell (task, length, depth, keys, ...) and "tokens", the prompt's true length


class TaskError(ValueError):
    """A task that cannot be built as asked."""


def encode(tok, text: str) -> list[int]:
    """A prompt's ids: BOS, then exactly what the tokenizer gives for the whole text."""
    return [tok.bos_id] + tok.sp.Encode(text)


def fit(tok, build: Callable[[int], str], length: int, lo: int = 0, hi: int | None = None,
        what: str = "prompt") -> tuple[int, list[int], str]:
    """The largest n >= lo whose text build(n) encodes to at most `length` tokens (BOS included), as
    (n, ids, text); the token count must not fall as n grows. A binary search over n that encodes the whole
    text at each probe, so the prompt is exactly its text's encoding (no pieces joined at token level); the
    result may fall short of `length` by less than one unit of n's filler, and callers report its true length.
    `hi` bounds the search where build(n) stops being valid above it."""
    memo: dict[int, tuple[list[int], str]] = {}

    def probe(n: int) -> int:
        if n not in memo:
            text = build(n)
            memo[n] = (encode(tok, text), text)
        return len(memo[n][0])

    if probe(lo) > length:
        raise TaskError(f"length={length} is too short for a {what}: the smallest one has {probe(lo)} tokens; "
                        f"use a longer length")
    good, step = lo, 1
    while hi is None or good < hi:  # step up to a bad n, each step sized by the tokens per unit so far
        n = good + step if hi is None else min(good + step, hi)
        if probe(n) > length:
            bad = n
            break
        per_unit = max((probe(n) - probe(lo)) / (n - lo), 1e-9)
        good, step = n, int((length - probe(n)) / per_unit) + 1
    else:
        return good, *memo[good]
    while bad - good > 1:
        mid = (good + bad) // 2
        if probe(mid) > length:
            bad = mid
        else:
            good = mid
    return good, *memo[good]


def passkey(tok, length: int, depth: float, rng: np.random.Generator) -> Example:
    """A passkey prompt of exactly `length` tokens (BOS included) with the needle at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth={depth} must be in [0, 1]")
    key = str(int(rng.integers(10000, 100000)))
    head = [tok.bos_id] + _ids(tok, PASSKEY_INTRO)
    needle = _ids(tok, f" The pass key is {key}. Remember it. {key} is the pass key.")
    tail = _ids(tok, " " + PASSKEY_QUESTION)
    sentence = _ids(tok, " " + FILLER)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 0:
        raise TaskError(f"length={length} is too short for a passkey prompt (needs {length - budget} tokens)")
    filler = (sentence * (budget // len(sentence) + 1))[:budget]
    cut = len(sentence) * round(depth * budget / len(sentence))  # a sentence boundary
    cut = min(cut, budget)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return Example(ids, key, {"task": "passkey", "length": length, "depth": depth,
                              "needle_start": len(head) + cut, "needle_tokens": len(needle)})


def _spaces(tok, n: int) -> list[int]:
    """n tokens of whitespace (the word-boundary piece), to bring a prompt to its exact length."""
    space = tok.sp.PieceToId("\u2581")
    if space == tok.sp.unk_id():
        raise TaskError(f"the tokenizer {tok.path} has no whitespace piece to pad prompts with")
    return [space] * max(n, 0)


def _fill_records(tok, length: int, head: list[int], tail_for, make_record, rng, min_records: int):
    """Records (ids, payload) added while the whole prompt stays within `length` tokens."""
    records = []
    used = len(head) + len(tail_for(None)) + 8
    while True:
        rec = make_record(len(records))
        if used + len(rec[0]) > length:
            break
        records.append(rec)
        used += len(rec[0])
    if len(records) < min_records:
        raise TaskError(f"length={length} holds only {len(records)} records; use a longer length")
    return records


def lines(tok, length: int, rng: np.random.Generator, index: int | None = None) -> Example:
    """LongChat-Lines of exactly `length` tokens (whitespace after the instructions makes up the last partial
    line); asks for line `index` (random by default)."""
    head = [tok.bos_id] + _ids(tok, (
        "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
        "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
        "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the "
        "corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:"))
    names: set[str] = set()

    def record(_):
        while True:
            name = f"{WORDS[rng.integers(len(WORDS))]}-{WORDS[rng.integers(len(WORDS))]}"
            if name not in names:
                names.add(name)
                break
        number = str(int(rng.integers(1, 50000)))
        return _ids(tok, f"\nline {name}: REGISTER_CONTENT is <{number}>"), (name, number)

    def tail(name):
        return _ids(tok, f"\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {name or 'x-y'}? "
                         f"I need the number. The <REGISTER_CONTENT> in line {name or 'x-y'} is")

    records = _fill_records(tok, length, head, tail, record, rng, min_records=2)
    index = int(rng.integers(len(records))) if index is None else index
    name, number = records[index][1]
    ids = head + [t for r in records for t in r[0]] + tail(name)
    ids = head + _spaces(tok, length - len(ids)) + ids[len(head):]
    return Example(ids, number, {"task": "lines", "length": length, "lines": len(records), "index": index,
                                 "relative_index": index / max(len(records) - 1, 1)})


def kv(tok, length: int, position: float, rng: np.random.Generator) -> Example:
    """Key-value retrieval of exactly `length` tokens (whitespace after the '{' makes up the last partial pair);
    asks for the key at
    round(position * (k - 1)), position in [0, 1] (0, 1/4, 1/2, 3/4, 1 give i = 0, k/4, k/2, 3k/4, k-1)."""
    if not 0.0 <= position <= 1.0:
        raise TaskError(f"position={position} must be in [0, 1]")
    head = [tok.bos_id] + _ids(tok, (
        "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"))

    def make_uuid():
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))

    def record(i):
        key, value = make_uuid(), make_uuid()
        return _ids(tok, f'{"," if i else ""}"{key}": "{value}"'), (key, value)

    def tail(key):
        return _ids(tok, f'}}\n\nKey: "{key or "0" * 36}"\nCorresponding value: "')

    records = _fill_records(tok, length, head, tail, record, rng, min_records=2)
    index = round(position * (len(records) - 1))
    key, value = records[index][1]
    ids = head + [t for r in records for t in r[0]] + tail(key)
    ids = head + _spaces(tok, length - len(ids)) + ids[len(head):]
    return Example(ids, value, {"task": "kv", "length": length, "keys": len(records), "index": index,
                                "position": position})


def score(task: str, output: str, answer: str) -> bool:
    """Exact match of the first number (passkey, lines) or UUID (kv) in the model's continuation."""
    if task == "kv":
        found = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", output)
    elif task in ("passkey", "lines"):
        found = re.search(r"\d+", output)
    else:
        raise TaskError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    return bool(found) and found.group(0) == answer


def answer_tokens(task: str) -> int:
    """How many tokens to generate: enough for the answer with any tokenizer (digits may be one piece each)."""
    return {"passkey": 8, "lines": 8, "kv": 48}[task]
