"""Long-context retrieval tasks (docs/evaluation.md) as the reference evaluations build and score them.

A prompt is its text, encoded once (`encode`: BOS + the tokenizer's pieces for the whole text), so its ids are
what the reference's tokenizer call gives; where a token budget is asked for, `fit` picks how much content fits
and meta["tokens"] is the prompt's true length. Random content comes from the numpy Generator passed in.

- passkey: PoSE's src/eval_passkey.py generate_prompt (which CREAM's paper uses): the intro, the filler
  sentence repeated n_prefix times, the pass-key line, n_suffix more repetitions and the question, joined by
  "\\n"; key uniform in [1, 50000]; n_prefix = round(depth * n_total), n_total the largest count that fits
  `length` tokens. Scored by the first integer of up to 10 generated tokens, as PoSE's test_model.
- lines: LongChat's longeval/utils.py generate_lines_testcases (LRT-NL): a header, `num_lines` lines
  "line <adjective>-<noun>: REGISTER_CONTENT is <n>" (n uniform in [1, 50000]) and the question for one of them;
  names from wonderwords' word lists. Scored as CREAM's src/evaluation/longchat_lines/eval.py: the first integer
  of up to 35 generated tokens. CREAM wraps every Lines prompt in fastchat's vicuna template (chat="vicuna").
- kv: "Lost in the Middle" (nelson-liu/lost-in-the-middle) key-value retrieval: `keys` uuid4 pairs as its
  get_kv_retrieval_prompt lays them out (kv_retrieval.prompt, optionally query-aware), the asked pair at a gold
  index (kv_gold_indices: CREAM's scripts/eval_lost_in_the_middle.sh for 75 and 140 keys). Scored as its
  scripts/evaluate_kv_responses.py (and CREAM's eval.py): the value, case-insensitive, anywhere in up to 50
  generated tokens. `best_subspan_em`, the papers' QA metric, is here as well.

`chat_wrap` puts a prompt in a chat template (CHAT_TEMPLATES) as fastchat 0.2.36 formats a single user turn.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import re
import string
import uuid
from typing import TYPE_CHECKING, Callable

import numpy as np

from cream_jax.errors import CreamError

if TYPE_CHECKING:
    from cream_jax.data.tokenizer import Tokenizer

TASKS = ("passkey", "lines", "kv")
CHAT_TEMPLATES = ("llama2", "vicuna")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_KEYS = (1, 50000)  # inclusive, as random.randint(1, 50000)

LINES_HEADER = ("Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and "
                "contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, "
                "memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve "
                "the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")
LINES_NUMBERS = (1, 50000)
LINES_GRID = (200, 300, 400, 500, 600, 680, 700, 800, 900, 1000, 1100, 1200, 1350)  # LongChat's testcases

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
KV_GRID = (75, 140, 300)  # lost-in-the-middle's kv_retrieval_data
KV_GOLD_INDICES = {75: [0, 18, 37, 54, 74], 140: [0, 34, 69, 104, 139]}  # CREAM's eval_lost_in_the_middle.sh

ANSWER_TOKENS = {"passkey": 10, "lines": 35, "kv": 50}  # PoSE, CREAM's Lines eval, CREAM's kv script
_SIGMAS = 3.0  # a length-driven count leaves this many standard deviations of its content's length spare


@dataclasses.dataclass
class Example:
    ids: list[int]  # exactly tok.encode(text) with BOS: the prompt is its text, encoded once
    text: str
    answer: str | list[str]  # RULER's tasks may expect several strings
    meta: dict  # the grid cell (task, length, depth, keys, ...) and "tokens", the prompt's true length


class TaskError(CreamError, ValueError):
    """A task that cannot be built as asked."""


def encode(tok: Tokenizer, text: str) -> list[int]:
    """A prompt's ids: BOS, then exactly what the tokenizer gives for the whole text."""
    return [tok.bos_id] + tok.sp.Encode(text)


def fit(tok: Tokenizer, build: Callable[[int], str], length: int, lo: int = 0, hi: int | None = None,
        what: str = "prompt") -> tuple[int, list[int], str]:
    """The largest n >= lo whose text build(n) encodes to at most `length` tokens (BOS included), as
    (n, ids, text); the token count must not fall as n grows. Each probe encodes the whole text, so the prompt is
    exactly its text's encoding; the result may fall short of `length` by less than one unit of n's content, and
    callers report its true length. `hi` bounds the search where build(n) stops being valid above it.

    Steps up from lo by the tokens per unit seen so far until a count does not fit, then interpolates inside
    that bracket (token counts are near-linear in n), halving it whenever interpolation stalls: a handful of
    encodings even for 256K-token prompts."""
    memo: dict[int, tuple[list[int], str]] = {}

    def probe(n: int) -> int:
        if n not in memo:
            text = build(n)
            memo[n] = (encode(tok, text), text)
        return len(memo[n][0])

    if probe(lo) > length:
        raise TaskError(f"length={length} is too short for a {what}: the smallest one has {probe(lo)} tokens; "
                        f"use a longer length")
    good, bad = lo, None
    while bad is None:
        if hi is not None and good >= hi:
            return good, *memo[good]
        per_unit = (probe(good) - probe(lo)) / (good - lo) if good > lo else 0.0
        step = max(1, int((length - probe(good)) / per_unit)) if per_unit > 0 else max(1, good - lo)
        n = good + step if hi is None else min(good + step, hi)
        if probe(n) > length:
            bad = n
        else:
            good = n
    bisect = False
    while bad - good > 1:
        width = bad - good
        if bisect:
            n = (good + bad) // 2
        else:
            frac = (length - probe(good)) / (probe(bad) - probe(good))
            n = min(max(good + int(frac * width), good + 1), bad - 1)
        if probe(n) > length:
            bad = n
        else:
            good = n
        bisect = not bisect and bad - good > width // 2
    return good, *memo[good]


# ----------------------------------------------------------------------------- chat templates


def chat_wrap(text: str, chat: str | None) -> str:
    """The prompt as one user turn of a chat template, awaiting the answer (BOS comes from `encode`):
    "llama2": "[INST] {text} [/INST]" (fastchat's llama-2 without a system prompt); "vicuna": fastchat's
    vicuna_v1.1, "{system} USER: {text} ASSISTANT:"; None: the text as it is."""
    if chat is None:
        return text
    if chat == "llama2":
        return f"[INST] {text} [/INST]"
    if chat == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {text} ASSISTANT:"
    raise TaskError(f"unknown chat template {chat!r}; allowed: {', '.join(CHAT_TEMPLATES)} (or None for none)")


def _spare(tok, items: list[str], n: int) -> int:
    """How many units of `items`' content to leave out of a length-driven count of n, so that prompts with
    other random content fit too: _SIGMAS standard deviations of n units' (and one question's) token count."""
    counts = np.array([len(x) for x in tok.sp.Encode(items[: max(n, 2)])], dtype=float)
    return math.ceil(_SIGMAS * counts.std() * math.sqrt(n + 1) / counts.mean())


# ----------------------------------------------------------------------------- passkey (PoSE)


PASSKEY_STYLES = ("pose", "spaced")


def passkey_text(n_prefix: int, n_suffix: int, key: int | str, style: str = "pose") -> str:
    """The passkey prompt: the intro, the filler n_prefix times, the pass-key line, the filler n_suffix times
    and the question. style "pose" (PoSE's, the default): the five parts joined by newlines, the filler repeated
    with no separator; "spaced": every sentence joined by one space, one paragraph (the format `make demo`
    pretrains its tiny model on)."""
    info = f"The pass key is {key}. Remember it. {key} is the pass key."
    if style == "pose":
        return "\n".join([PASSKEY_INTRO, FILLER * n_prefix, info, FILLER * n_suffix, PASSKEY_QUESTION])
    if style == "spaced":
        return " ".join([PASSKEY_INTRO, *[FILLER] * n_prefix, info, *[FILLER] * n_suffix, PASSKEY_QUESTION])
    raise TaskError(f"unknown passkey style {style!r}; allowed: {', '.join(PASSKEY_STYLES)}")


def passkey(tok: Tokenizer, length: int, depth: float, rng: np.random.Generator, chat: str | None = None,
            key_range: tuple[int, int] = PASSKEY_KEYS, style: str = "pose") -> Example:
    """A passkey prompt of at most `length` tokens (BOS included): the most filler repetitions that fit, the
    pass-key line after round(depth * total) of them; the key uniform in `key_range` (inclusive; PoSE's by
    default); `style` as `passkey_text`."""
    if not 0.0 <= depth <= 1.0:
        raise TaskError(f"depth={depth} must be in [0, 1]")
    if not 0 <= key_range[0] <= key_range[1]:
        raise TaskError(f"key_range={key_range} must be (low, high) with 0 <= low <= high")
    passkey_text(0, 0, 0, style)  # an unknown style fails before any work
    key = int(rng.integers(key_range[0], key_range[1] + 1))

    def build(n: int) -> str:
        return chat_wrap(passkey_text(round(depth * n), n - round(depth * n), key, style), chat)

    n, ids, text = fit(tok, build, length, what="passkey prompt")
    n_prefix = round(depth * n)
    needle_start = len(encode(tok, text[: text.index(f"The pass key is {key}.")]))
    return Example(ids, text, str(key), {"task": "passkey", "length": length, "depth": depth, "tokens": len(ids),
                                         "needle_start": needle_start, "n_prefix": n_prefix, "n_total": n,
                                         "chat": chat})


# ----------------------------------------------------------------------------- LongChat-Lines


@functools.cache
def line_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) from wonderwords' word lists: single lowercase words, profanities left out."""
    assets = importlib.resources.files("wonderwords") / "assets"

    def read(name: str) -> set[str]:
        return {w.strip() for w in (assets / name).read_text(encoding="utf-8").splitlines()}

    bad = read("profanitylist.txt")
    adjectives, nouns = ([w for w in sorted(read(f)) if re.fullmatch(r"[a-z]+", w) and w not in bad]
                         for f in ("adjectivelist.txt", "nounlist.txt"))
    return tuple(adjectives), tuple(nouns)


def line_names(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct "<adjective>-<noun>" names. Up to one per adjective, as LongChat draws them (distinct
    adjectives paired with distinct nouns); beyond that, distinct adjective-noun pairs."""
    adjectives, nouns = line_words()
    if n > len(adjectives) * len(nouns):
        raise TaskError(f"num_lines={n} exceeds the {len(adjectives) * len(nouns)} distinct adjective-noun names "
                        f"of wonderwords' lists; use fewer lines")
    if n <= len(adjectives):
        a, b = rng.choice(len(adjectives), n, replace=False), rng.choice(len(nouns), n, replace=False)
    else:
        a, b = np.divmod(rng.choice(len(adjectives) * len(nouns), n, replace=False), len(nouns))
    return [f"{adjectives[i]}-{nouns[j]}" for i, j in zip(a, b)]


def line_records(n: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """n (name, number) lines: distinct names, numbers uniform in [1, 50000]."""
    numbers = rng.integers(LINES_NUMBERS[0], LINES_NUMBERS[1] + 1, n)
    return list(zip(line_names(n, rng), (int(x) for x in numbers)))


def _line(name: str, number: int | str) -> str:
    return f"line {name}: REGISTER_CONTENT is <{number}>"


def lines_text(records: list[tuple[str, int | str]], asked_index: int) -> str:
    """LongChat's Lines prompt for these (name, number) lines, asking for the number of line `asked_index`."""
    if not records:
        raise TaskError("a Lines prompt needs at least one line")
    if not 0 <= asked_index < len(records):
        raise TaskError(f"index={asked_index} is outside the {len(records)} lines; use 0..{len(records) - 1}")
    if len({name for name, _ in records}) != len(records):
        raise TaskError("line names repeat; each line needs its own name")
    body = "".join(_line(name, number) + "\n" for name, number in records)
    asked = records[asked_index][0]
    return (f"{LINES_HEADER}{body}\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line "
            f"{asked}? I need the number.")


def lines(tok: Tokenizer, num_lines: int, rng: np.random.Generator, index: int | None = None,
          chat: str | None = None) -> Example:
    """A Lines prompt of `num_lines` lines asking for line `index` (uniform by default)."""
    if num_lines < 1:
        raise TaskError(f"num_lines={num_lines} must be at least 1")
    records = line_records(num_lines, rng)
    index = int(rng.integers(num_lines)) if index is None else index
    text = chat_wrap(lines_text(records, index), chat)
    ids = encode(tok, text)
    return Example(ids, text, str(records[index][1]), {
        "task": "lines", "lines": num_lines, "index": index, "relative_index": index / max(num_lines - 1, 1),
        "tokens": len(ids), "chat": chat})


def lines_for_length(tok: Tokenizer, length: int, chat: str | None = None) -> int:
    """The most lines whose prompts fit `length` tokens: the count that fits with fixed-seed content, less
    3 standard deviations of the lines' token counts (so random content stays within length all but rarely)."""
    records = line_records(max(length // 8, 2), np.random.default_rng(0))  # more lines than can fit

    def build(n: int) -> str:
        return chat_wrap(lines_text(records[:n], 0), chat)

    n, _, _ = fit(tok, build, length, lo=1, hi=len(records), what="Lines prompt")
    return max(1, n - _spare(tok, [_line(*r) for r in records], n))


# ----------------------------------------------------------------------------- key-value retrieval


def kv_records_text(pairs: list[tuple[str, str]]) -> str:
    """lost-in-the-middle's JSON layout: '{"k": "v",\\n "k": "v",\\n ... "k": "v"}'."""
    return "{" + ",\n ".join(f'"{key}": "{value}"' for key, value in pairs) + "}"


def kv_text(pairs: list[tuple[str, str]], gold_index: int, query_aware: bool = False) -> str:
    """lost-in-the-middle's kv_retrieval prompt for these (key, value) pairs asking for pair `gold_index`;
    query_aware: its query-aware contextualization (the key also before the data)."""
    if len(pairs) < 2:
        raise TaskError(f"a key-value prompt needs at least 2 pairs, got {len(pairs)}")
    if not 0 <= gold_index < len(pairs):
        raise TaskError(f"index={gold_index} is outside the {len(pairs)} keys; use 0..{len(pairs) - 1}")
    if len({key for key, _ in pairs}) != len(pairs):
        raise TaskError("keys repeat; each pair needs its own key")
    key = pairs[gold_index][0]
    query = f'Key: "{key}"\n\n' if query_aware else ""
    return (f"{KV_INSTRUCTION}\n\n{query}JSON data:\n{kv_records_text(pairs)}\n\n"
            f'Key: "{key}"\nCorresponding value:')


def kv_pairs(keys: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`keys` (key, value) pairs of uuid4 strings (as str(uuid.uuid4())) drawn from rng, the keys distinct."""
    pairs: dict[str, str] = {}
    while len(pairs) < keys:
        raw = rng.bytes(32 * (keys - len(pairs)))
        for i in range(0, len(raw), 32):
            key = str(uuid.UUID(bytes=raw[i:i + 16], version=4))
            pairs.setdefault(key, str(uuid.UUID(bytes=raw[i + 16:i + 32], version=4)))
    return list(pairs.items())


def kv(tok: Tokenizer, keys: int, index: int, rng: np.random.Generator, chat: str | None = None,
       query_aware: bool = False) -> Example:
    """Key-value retrieval over `keys` random pairs, asking for the pair at `index`."""
    if keys < 2:
        raise TaskError(f"keys={keys} must be at least 2")
    pairs = kv_pairs(keys, rng)
    text = chat_wrap(kv_text(pairs, index, query_aware), chat)
    ids = encode(tok, text)
    return Example(ids, text, pairs[index][1], {"task": "kv", "keys": keys, "index": index, "tokens": len(ids),
                                               "query_aware": query_aware, "chat": chat})


def kv_keys_for_length(tok: Tokenizer, length: int, chat: str | None = None, query_aware: bool = False) -> int:
    """The most keys whose prompts fit `length` tokens: the count that fits with fixed-seed content, less
    3 standard deviations of the pairs' token counts (so random content stays within length all but rarely)."""
    pairs = kv_pairs(max(length // 32, 3), np.random.default_rng(0))  # more pairs than can fit

    def build(n: int) -> str:
        return chat_wrap(kv_text(pairs[:n], 0, query_aware), chat)

    n, _, _ = fit(tok, build, length, lo=2, hi=len(pairs), what="key-value prompt")
    return max(2, n - _spare(tok, [f'"{k}": "{v}"' for k, v in pairs], n))


def kv_gold_indices(keys: int) -> list[int]:
    """The asked positions: CREAM's for 75 and 140 keys; otherwise floor(j * (keys - 1) / 4) for j = 0..4 (first,
    quarters, last), the rule that gives CREAM's 140-key positions (and 75's but for 54, where it gives 55)."""
    if keys < 2:
        raise TaskError(f"keys={keys} must be at least 2")
    if keys in KV_GOLD_INDICES:
        return list(KV_GOLD_INDICES[keys])
    return sorted({j * (keys - 1) // 4 for j in range(5)})


# ----------------------------------------------------------------------------- scoring


def normalize_answer(s: str) -> str:
    """lost-in-the-middle's (SQuAD's) normalization: lowercase, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def best_subspan_em(prediction: str, ground_truths: list[str]) -> float:
    """lost-in-the-middle's QA metric: 1.0 if a normalized ground truth is a substring of the normalized
    prediction."""
    prediction = normalize_answer(prediction)
    return float(any(normalize_answer(truth) in prediction for truth in ground_truths))


def first_integer(output: str) -> int | None:
    """The first run of digits in the output as an integer (PoSE's and CREAM's parsing), None if there is none."""
    found = re.search(r"\d+", output)
    return int(found.group()) if found else None


def score(task: str, output: str, answer: str) -> float:
    """1.0 or 0.0 as the reference scores the continuation: passkey (PoSE) and lines (CREAM) the first integer
    equals the answer; kv (lost-in-the-middle) the value occurs in it, case-insensitively."""
    if task in ("passkey", "lines"):
        return float(first_integer(output) == int(answer))
    if task == "kv":
        return float(answer.lower() in output.lower())
    raise TaskError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


def answer_tokens(task: str) -> int:
    """How many tokens the reference generates for the task's answer."""
    if task not in ANSWER_TOKENS:
        raise TaskError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    return ANSWER_TOKENS[task]
