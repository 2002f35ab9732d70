"""RULER's synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER), generated offline from a seed at a token budget.

Each task follows RULER's generator with RULER's default arguments (scripts/synthetic.yaml):
- niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery: scripts/data/synthetic/niah.py.
  Needles "One of the special magic {type} for {key} is: {value}." (keys: adjective-noun words or uuids; values:
  7-digit numbers or uuids) in a haystack: "noise" (RULER's grass-sky-sun sentence, one a line, the needles on
  lines at random indexes), "essay" (a corpus's words cut into sentences, the needles between sentences at depths
  drawn from 40 evenly spaced ones, 0..100 %), or "needle" (random distractor needles, one a line).
- vt: scripts/data/synthetic/variable_tracking.py: one chain of 4 hops ("VAR X = 12345", "VAR Y = VAR X ")
  among noise lines, after its one-shot example (a 3-letter chain in about 500 tokens of noise) as RULER adds it.
- cwe: scripts/data/synthetic/common_words_extraction.py: a numbered list of words, 10 of them 30 times and the
  rest 3 times, after one solved example of 40 words (10 x 10, 30 x 3); below length 4096, 20-word examples
  (3 x, 1 x) and 6 x / 1 x, as RULER does.
- fwe: scripts/data/synthetic/freq_words_extraction.py: coded 6-letter words with Zipf counts
  int(n * k^-2 / zeta(2)), the most frequent replaced by '...', from a vocabulary of (length - 50) // 50 words.

Templates are scripts/data/synthetic/constants.py's, composed as scripts/data/prepare.py does: the model template
around the task template, then the answer prefix ("base", chat=None: no model template; chat="llama2":
`tasks.chat_wrap`, "[INST] {text} [/INST]", RULER's "meta-chat"); the prompt is RULER's input + answer_prefix.
niah's singular wording ("A special magic number ... is") follows niah.py's replacements. Scores are
scripts/eval/synthetic/constants.py's string_match_all (the fraction of the references found in the output,
case-insensitive; RULER's qa tasks, not built here, use string_match_part, the best of them) after
scripts/eval/evaluate.py's postprocess_pred, as a fraction in [0, 1] per example (RULER reports the mean x 100).

`length` is RULER's max_seq_length: the prompt has at most length - answer_tokens(task) tokens (BOS included),
the largest haystack that fits (`tasks.fit`), so the prompt and the generated answer fit `length`.

What differs from RULER, and why:
- The essay haystack is a registry corpus (Jane Austen's novels, "austen", by default; "kjv" or any name or path
  that `sources.resolve_files` takes), not Paul Graham's essays, which no package registry ships. Its text is
  joined, whitespace-normalized and cut into words as RULER cuts the essays, repeated if too short.
- Sentences are cut by a Punkt-like rule of our own (a word ending in . ? or !, closing quotes or brackets after
  it, ends a sentence unless it is a title abbreviation such as "Mr." or a single-capital initial), not NLTK's
  sent_tokenize: NLTK and its punkt model are not dependencies, and the models are not on a package registry.
- cwe's words are wonderwords' nouns, adjectives and verbs, as RULER's; RULER falls back to its own
  english_words.json (which no package ships) when a length needs more words than those; we raise TaskError
  there (past about 200K tokens with the 32000-piece tokenizer).
- Randomness is a numpy Generator's: the content is RULER's distribution, not its draws. RULER's fixed-seed
  shuffles (random.Random(seed).shuffle of the needles and of the cwe/fwe lists) are shuffles from the
  Generator; word keys are a uniform adjective and noun (RULER: uniform over the set of their "adj-noun"
  strings, the same but for the few strings two hyphenated pairs share); vt's variable names are drawn distinct
  (RULER keeps a repeat in the rare case of one). vt's one-shot example is drawn with its final names and value
  and fit to 500 tokens with them (RULER fits it with placeholders, then renames).
- The budget counts BOS (RULER counts the text's tokens only), and the haystack size is the largest that fits
  (RULER: a binary search, then steps of 500 essay words, 25 noise lines or 10 words when a sample overflows;
  fwe: steps of budget // 32 words).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import importlib.resources
import re
import string
import uuid
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from cream_jax.tasks import Example, TaskError, chat_wrap, fit

if TYPE_CHECKING:
    from cream_jax.data.tokenizer import Tokenizer

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
METRIC = {task: "string_match_all" for task in TASKS}  # RULER: string_match_part only for qa_1 and qa_2
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate per generator

# scripts/data/synthetic/constants.py
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                "above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"

# scripts/data/synthetic/niah.py and variable_tracking.py
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int))
SINGULAR = (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer"))  # niah.py, one answer


@dataclasses.dataclass(frozen=True)
class Niah:
    haystack: str  # noise | essay | needle
    type_k: str  # words | numbers | uuids
    type_v: str
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1


NIAH = {  # scripts/synthetic.yaml
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", num_k=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", num_v=4),
    "niah_multiquery": Niah("essay", "words", "numbers", num_q=4),
}
VT_CHAINS, VT_HOPS, VT_ICL_TOKENS = 1, 4, 500  # synthetic.yaml; the one-shot example's max_seq_length
CWE_FREQ, CWE_FREQ_UNCOMMON, CWE_NUM_COMMON, CWE_SHOTS = 30, 3, 10, 1
FWE_ALPHA, FWE_WORD_LEN = 2.0, 6


def _check(task: str) -> str:
    if task not in TASKS:
        raise TaskError(f"unknown RULER task {task!r}; allowed: {', '.join(TASKS)}")
    return "niah" if task in NIAH else task


def answer_tokens(task: str) -> int:
    """RULER's tokens_to_generate for the task (niah 128, vt 30, cwe 120, fwe 50)."""
    family = _check(task)
    return TOKENS_TO_GENERATE[family]


# ----------------------------------------------------------------------------- templates (pure)


def compose(template: str, answer_prefix: str, chat: str | None = None) -> str:
    """prepare.py's prompt template: the model template around the task template, then the answer prefix."""
    return chat_wrap(template, chat) + answer_prefix


def fill(template: str, **values: object) -> str:
    """str.format for {name} fields in one pass (a value's or a chat template's own braces stay as they are)."""
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m[1]]) if m[1] in values else m[0], template)


def niah_needle(type_needle_v: str, key: str, value: str) -> str:
    return fill(NEEDLE, type_needle_v=type_needle_v, key=key, value=value)


def niah_query(queries: Sequence[str]) -> str:
    """'a', or 'a, b, and c'."""
    return ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]


def niah_prompt(context: str, queries: Sequence[str], type_needle_v: str, num_needle_v: int,
                chat: str | None = None) -> str:
    """niah.py's prompt; one expected answer (one query, one value) makes the wording singular."""
    template = compose(NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, chat)
    if len(queries) * num_needle_v == 1:
        for old, new in SINGULAR:
            template = template.replace(old, new)
        type_needle_v = type_needle_v[:-1]
    return fill(template, type_needle_v=type_needle_v, context=context, query=niah_query(queries))


def essay_context(sentences: Sequence[str], needles: Sequence[str], depths: Sequence[int]) -> str:
    """The needles between the sentences, needle i (in order) after sentence int(len * depth_i / 100) of the
    sorted depths (percent), the pieces joined by spaces (an empty stretch leaves a double space, as in RULER)."""
    cuts = [0] + sorted(int(len(sentences) * (d / 100)) for d in depths) + [len(sentences)]
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(" ".join(sentences[a:b]))
        if i < len(needles):
            parts.append(needles[i])
    return " ".join(parts)


def lines_context(filler: Sequence[str], needles: Sequence[str], indexes: Sequence[int]) -> str:
    """The filler lines with needle i inserted at the i-th largest index (so at the largest index first), joined
    by newlines: niah.py's noise and needle haystacks."""
    lines = list(filler)
    for index, needle in zip(sorted(indexes, reverse=True), needles):
        lines.insert(index, needle)
    return "\n".join(lines)


def vt_chain(names: Sequence[str], value: str) -> list[str]:
    """A variable chain: "VAR A = 12345", then "VAR B = VAR A " (trailing space as in RULER) for each hop."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def vt_context(num_noise: int, chains: Sequence[Sequence[str]], positions: Sequence[Sequence[int]]) -> str:
    """variable_tracking.py's noise haystack: chain c's line j at sorted(positions[c])[j] + j of the lines so far."""
    lines = [NOISE] * num_noise
    for chain, pos in zip(chains, positions):
        for j, (p, line) in enumerate(zip(sorted(pos), chain)):
            lines.insert(p + j, line)
    return "\n".join(lines).replace(". \n", ".\n")


def vt_example(context: str, value: str, names: Sequence[str]) -> str:
    """vt's one-shot example: the task template and answer prefix (no model template), then its answer."""
    text = fill(VT_TEMPLATE + VT_ANSWER_PREFIX, context=context, query=value, num_v=len(names))
    return text + " " + " ".join(names) + "\n"


def vt_prompt(context: str, value: str, num_v: int, example: str = "", chat: str | None = None) -> str:
    """vt's prompt, the one-shot example (and a newline) put before the task template, inside the model template."""
    text = fill(compose(VT_TEMPLATE, VT_ANSWER_PREFIX, chat), context=context, query=value, num_v=num_v)
    cut = text.index(VT_TEMPLATE[:20])
    return text[:cut] + example + "\n" + text[cut:] if example else text


def numbered(words: Sequence[str]) -> str:
    """'1. w1 2. w2 ...'"""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_repeats(common: Sequence[str], uncommon: Sequence[str], freq: int, freq_uncommon: int) -> list[str]:
    return list(common) * freq + list(uncommon) * freq_uncommon


def cwe_prompt(word_list: Sequence[str], shots: Sequence[tuple[Sequence[str], Sequence[str]]],
               chat: str | None = None) -> str:
    """cwe's prompt: each solved example (its list, its common words) and the list to solve, each in the full
    template, joined by newlines."""
    template = compose(CWE_TEMPLATE, CWE_ANSWER_PREFIX, chat)
    solved = [fill(template, context=numbered(lst), query="") + " " + numbered(answer) for lst, answer in shots]
    return "\n".join(solved) + "\n" + fill(template, context=numbered(word_list), query="")


def fwe_counts(num_words: int, vocab_size: int, alpha: float = FWE_ALPHA) -> np.ndarray:
    """Zipf counts int(num_words * k^-alpha / zeta(alpha)) of ranks k = 1..vocab_size."""
    from scipy.special import zeta

    k = np.arange(1, vocab_size + 1)
    return (num_words * (k ** -alpha) / zeta(alpha)).astype(int)


def fwe_words(vocab: Sequence[str], num_words: int, alpha: float = FWE_ALPHA) -> list[str]:
    """The coded words before shuffling: vocab[k-1] repeated by rank k's count."""
    return [w for w, c in zip(vocab, fwe_counts(num_words, len(vocab), alpha)) for _ in range(c)]


def fwe_prompt(coded_words: Sequence[str], chat: str | None = None) -> str:
    return fill(compose(FWE_TEMPLATE, FWE_ANSWER_PREFIX, chat), context=" ".join(coded_words), query="")


# ----------------------------------------------------------------------------- word lists and haystacks


@functools.cache
def wonderwords_list(name: str) -> tuple[str, ...]:
    """A wonderwords word list as RULER reads it (random_word._get_words_from_text_file: lines, right-stripped)."""
    path = importlib.resources.files("wonderwords") / "assets" / name
    with path.open("r", encoding="utf-8") as f:
        return tuple(line.rstrip() for line in f.readlines())


@functools.cache
def key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """niah's word keys "adjective-noun": the distinct adjectives and nouns."""
    return (tuple(sorted(set(wonderwords_list("adjectivelist.txt")))),
            tuple(sorted(set(wonderwords_list("nounlist.txt")))))


@functools.cache
def cwe_words() -> tuple[str, ...]:
    """cwe's words: wonderwords' nouns, adjectives and verbs, distinct, sorted."""
    return tuple(sorted(set(wonderwords_list("nounlist.txt") + wonderwords_list("adjectivelist.txt")
                            + wonderwords_list("verblist.txt"))))


_SENTENCE_END = re.compile(r"[\"'(\[_\u2018\u201c]*(.*?)([.?!]+)[\"')\]_\u2019\u201d]*")
ABBREVIATIONS = frozenset("mr mrs ms messrs dr st esq rev col capt gen lt sgt prof jr sr vs".split())


def ends_sentence(word: str) -> bool:
    """Whether a word ends a sentence: it ends in . ? or ! (closing quotes or brackets may follow), and is not a
    title abbreviation ("Mr.") or an initial ("J."). Decided by the word alone, so a text's prefix splits as
    the text does."""
    m = _SENTENCE_END.fullmatch(word)
    if not m:
        return False
    stem, stop = m[1], m[2]
    return not (stop == "." and (stem.lower() in ABBREVIATIONS or (len(stem) == 1 and stem.isupper())))


def split_sentences(words: Sequence[str]) -> list[str]:
    """Sentences of a text given as words, each its words joined by spaces."""
    out, start = [], 0
    for i, w in enumerate(words):
        if ends_sentence(w):
            out.append(" ".join(words[start:i + 1]))
            start = i + 1
    if start < len(words):
        out.append(" ".join(words[start:]))
    return out


class Essay:
    """A corpus as RULER's essay haystack: its words (whitespace-normalized) and, once, its sentences, so the
    sentences of its first n words come from a slice."""

    def __init__(self, words: list[str]):
        if not words:
            raise TaskError("the essay corpus has no words; use another corpus")
        self.words = words
        self.ends = [i + 1 for i, w in enumerate(words) if ends_sentence(w)]  # sentence i is words[ends[i-1]:ends[i]]
        starts = [0] + self.ends[:-1]
        self.sentences = [" ".join(words[a:b]) for a, b in zip(starts, self.ends)]

    def first(self, n: int) -> list[str]:
        """The sentences of the first n words (repeating the corpus past its end, as RULER repeats the essays)."""
        if n > len(self.words):
            return _repeated(self, -(-n // len(self.words))).first(n)
        k = bisect.bisect_right(self.ends, n)
        start = self.ends[k - 1] if k else 0
        return self.sentences[:k] + ([" ".join(self.words[start:n])] if n > start else [])


@functools.lru_cache(maxsize=4)
def _repeated(essay: Essay, copies: int) -> Essay:
    return Essay(essay.words * copies)


@functools.lru_cache(maxsize=4)
def essay(corpus: str) -> Essay:
    """The corpus's documents joined and cut into words (RULER: re.sub(r'\\s+', ' ', text).split(' '))."""
    from cream_jax.data import sources

    return Essay(" ".join(sources.read_documents(sources.resolve_files(corpus))).split())


# ----------------------------------------------------------------------------- random content


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def random_value(kind: str, rng: np.random.Generator) -> str:
    """niah.py's generate_random: a 7-digit number, an adjective-noun word or a uuid4."""
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))
    if kind == "words":
        adjectives, nouns = key_words()
        return f"{adjectives[rng.integers(len(adjectives))]}-{nouns[rng.integers(len(nouns))]}"
    if kind == "uuids":
        return _uuid(rng)
    raise TaskError(f"unknown needle type {kind!r}; allowed: numbers, words, uuids")


def _letters(rng: np.random.Generator, k: int, alphabet: str) -> str:
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=k))


def _distinct_letters(rng: np.random.Generator, count: int, k: int, alphabet: str) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < count:
        out.setdefault(_letters(rng, k, alphabet))
    return list(out)


class _Pool:
    """Random items drawn in order as more are asked for, so the first n are the same for every n."""

    def __init__(self, make: Callable[[], str]):
        self.make, self.items = make, []

    def __call__(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(self.make())
        return self.items[:n]


def _sample(seed: int, n: int, population: int, k: int) -> list[int]:
    """random.sample(range(population), k) for haystack size n: fixed for (seed, n), so build(n) is a function."""
    return [int(i) for i in np.random.default_rng([seed, n]).choice(population, k, replace=False)]


def _permuted(items: Sequence[str], seed: int, n: int) -> list[str]:
    return [items[i] for i in np.random.default_rng([seed, n]).permutation(len(items))]


# ----------------------------------------------------------------------------- fitting a haystack to a budget


class ChunkCounter:
    """A text's token count as the sum of its space-separated chunks' counts (SentencePiece encodes each
    whitespace-split piece on its own, so this is exact but for runs of spaces): an estimate that encodes each
    distinct chunk once, to start `tasks.fit` near its answer."""

    def __init__(self, tok: Tokenizer):
        self.sp, self.counts = tok.sp, {}

    def __call__(self, text: str) -> int:
        chunks = text.split(" ")
        new = [c for c in set(chunks) if c not in self.counts]
        if new:
            self.counts.update(zip(new, map(len, self.sp.Encode(new))))
        return 1 + sum(map(self.counts.__getitem__, chunks))  # BOS


def estimate(size: Callable[[int], int], target: int, lo: int, hi: int | None = None, tries: int = 12) -> int:
    """About the largest n in [lo, hi] with size(n) <= target, for a near-linear non-decreasing size: secant
    steps (the rate since lo) kept inside the bracket found so far, at most `tries` evaluations after lo's."""
    s_lo = size(lo)
    good, bad = lo, None if hi is None else hi + 1
    n, s = lo, s_lo
    for _ in range(tries):
        if s <= target:
            good = max(good, n)
        else:
            bad = n if bad is None else min(bad, n)
        if s_lo > target or (bad is not None and bad - good <= 1):
            break
        rate = (s - s_lo) / (n - lo) if n > lo else 0.0
        nxt = n + (round((target - s) / rate) if rate > 0 else 2 * (n - lo) + 16)
        nxt = max(nxt, good + 1) if bad is None else min(max(nxt, good + 1), bad - 1)
        n, s = nxt, size(nxt)
    return good


def fit_haystack(tok: Tokenizer, build: Callable[[int], str], budget: int, lo: int, hi: int | None = None,
                 what: str = "prompt") -> tuple[int, list[int], str]:
    """`tasks.fit` (the largest n whose build(n) encodes to at most `budget` tokens) started from the chunk-count
    estimate, so that a 128K-token prompt is encoded a few times rather than a dozen; from lo where the
    estimate overshoots."""
    counter = ChunkCounter(tok)
    for spare in (0, 32):  # runs of spaces (a needle at depth 0 or 100) may make the estimate a token short
        guess = estimate(lambda n: counter(build(n)), budget - spare, lo, hi)
        if guess > lo:
            try:
                return fit(tok, build, budget, lo=guess, hi=hi, what=what)
            except TaskError:  # the estimate was too high
                pass
    return fit(tok, build, budget, lo=lo, hi=hi, what=what)


# ----------------------------------------------------------------------------- builders


def _niah(tok, task: str, budget: int, rng: np.random.Generator, corpus: str, chat: str | None):
    cfg = NIAH[task]
    num_k = max(cfg.num_k, cfg.num_q)
    keys = [random_value(cfg.type_k, rng) for _ in range(num_k)]
    values = [[random_value(cfg.type_v, rng) for _ in range(cfg.num_v)] for _ in keys]
    needles = [niah_needle(cfg.type_v, k, v) for k, vs in zip(keys, values) for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    asked = [int(i) for i in rng.choice(num_k, cfg.num_q, replace=False)]
    queries, answers = [keys[i] for i in asked], [v for i in asked for v in values[i]]
    seed = int(rng.integers(2**63))
    meta = {"haystack": cfg.haystack, "keys": keys, "queries": queries}
    if cfg.haystack == "essay":
        depths = [DEPTHS[i] for i in rng.choice(len(DEPTHS), len(needles), replace=False)]
        meta["depths"] = depths
        hay = essay(corpus)

        def context(n: int) -> str:
            return essay_context(hay.first(n), needles, depths)
    else:
        if cfg.haystack == "noise":
            def filler(n: int) -> list[str]:
                return [NOISE] * n
        else:
            child = np.random.default_rng(int(rng.integers(2**63)))
            filler = _Pool(lambda: niah_needle(cfg.type_v, random_value(cfg.type_k, child),
                                               random_value(cfg.type_v, child)))

        def context(n: int) -> str:
            return lines_context(filler(n), needles, _sample(seed, n, n, len(needles)))

    lo = 1 if cfg.haystack == "essay" else len(needles)
    n, ids, text = fit_haystack(tok, lambda n: niah_prompt(context(n), queries, cfg.type_v, cfg.num_v, chat), budget,
                       lo=lo, what=f"{task} prompt")
    meta["needle_depths"] = [round(text.index(x) / len(text), 4) for x in needles]
    return ids, text, answers, n, meta


def _vt(tok, budget: int, rng: np.random.Generator, chat: str | None):
    size = VT_HOPS + 1
    names = _distinct_letters(rng, VT_CHAINS * size, 5, string.ascii_uppercase)
    chains = [vt_chain(names[c * size:(c + 1) * size], str(int(rng.integers(10000, 99999))))
              for c in range(VT_CHAINS)]
    value = chains[0][0].split("=")[-1].strip()

    def positions(seed: int, n: int, chain_list: list[list[str]]) -> list[list[int]]:
        before = np.cumsum([0] + [len(c) for c in chain_list])  # chain c goes among n + before[c] lines
        gen = np.random.default_rng([seed, n])
        return [[int(i) for i in gen.choice(n + before[c], len(chain), replace=False)]
                for c, chain in enumerate(chain_list)]

    icl_names = _distinct_letters(rng, size, 3, string.ascii_uppercase)
    icl_value = str(int(rng.integers(10000, 99999)))
    icl_chain = [vt_chain(icl_names, icl_value)]
    icl_seed, seed = (int(x) for x in rng.integers(2**63, size=2))

    def icl_text(n: int) -> str:
        return fill(VT_TEMPLATE + VT_ANSWER_PREFIX, context=vt_context(n, icl_chain, positions(icl_seed, n, icl_chain)),
                    query=icl_value, num_v=size)

    # RULER fits the example's input to 500 tokens without BOS
    m, _, icl_input = fit(tok, icl_text, VT_ICL_TOKENS + 1, lo=size, what="vt one-shot example")
    example = icl_input + " " + " ".join(icl_names) + "\n"

    def build(n: int) -> str:
        return vt_prompt(vt_context(n, chains, positions(seed, n, chains)), value, size, example, chat)

    n, ids, text = fit_haystack(tok, build, budget, lo=size, what="vt prompt")
    return ids, text, names[:size], n, {"value": value, "example_noise": m}


def _cwe(tok, length: int, budget: int, rng: np.random.Generator, chat: str | None):
    words = cwe_words()
    (shot_n, shot_freq, shot_freq_u), (freq, freq_u) = cwe_sizes(length)
    shots = []
    for _ in range(CWE_SHOTS):
        chosen = [words[i] for i in rng.choice(len(words), shot_n, replace=False)]
        common, uncommon = chosen[:CWE_NUM_COMMON], chosen[CWE_NUM_COMMON:]
        lst = cwe_repeats(common, uncommon, shot_freq, shot_freq_u)
        shots.append(([lst[i] for i in rng.permutation(len(lst))], common))
    order = rng.permutation(len(words))
    seed = int(rng.integers(2**63))

    def word_list(n: int) -> list[str]:
        chosen = [words[i] for i in order[:n]]
        return _permuted(cwe_repeats(chosen[:CWE_NUM_COMMON], chosen[CWE_NUM_COMMON:], freq, freq_u), seed, n)

    n, ids, text = fit_haystack(tok, lambda n: cwe_prompt(word_list(n), shots, chat), budget, lo=CWE_NUM_COMMON,
                       hi=len(words), what="cwe prompt")
    if n == len(words):
        raise TaskError(f"cwe at length={length} needs more than the {len(words)} distinct words of wonderwords' "
                        f"lists (RULER then draws from its english_words.json); use a shorter length")
    return ids, text, [words[i] for i in order[:CWE_NUM_COMMON]], n, {"words": n}


def cwe_sizes(length: int) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """((the example's words, its common and uncommon repeats), (the list's common and uncommon repeats)):
    ((40, 10, 3), (30, 3)) as RULER, ((20, 3, 1), (6, 1)) below its max_seq_length 4096."""
    if length < 4096:
        return (20, 3, 1), (6, 1)
    return (40, 10, 3), (CWE_FREQ, CWE_FREQ_UNCOMMON)


def _fwe_lo(vocab_size: int) -> int:
    """The fewest words whose counts rank the three answers (ranks 2-4) strictly above the rest."""
    n = 1
    while True:
        c = fwe_counts(n, vocab_size)
        if c[3] >= 1 and c[1] > c[2] > c[3] > (c[4] if vocab_size > 4 else 0):
            return n
        n += 1


def _fwe(tok, length: int, budget: int, rng: np.random.Generator, chat: str | None):
    vocab_size = (length - TOKENS_TO_GENERATE["fwe"]) // 50
    if vocab_size < 5:
        raise TaskError(f"length={length} gives fwe a vocabulary of {vocab_size} words (RULER: (length - 50) // 50);"
                        f" use length >= 300")
    vocab = sorted(_distinct_letters(rng, vocab_size, FWE_WORD_LEN, string.ascii_lowercase))
    vocab = [vocab[i] for i in rng.permutation(vocab_size)]
    vocab[0] = "..."  # the most frequent is noise
    seed = int(rng.integers(2**63))

    def build(n: int) -> str:
        return fwe_prompt(_permuted(fwe_words(vocab, n), seed, n), chat)

    n, ids, text = fit_haystack(tok, build, budget, lo=_fwe_lo(vocab_size), what="fwe prompt")
    return ids, text, vocab[1:4], n, {"vocab_size": vocab_size, "words": n}


def build(tok: Tokenizer, task: str, length: int, rng: np.random.Generator, corpus: str = "austen",
          chat: str | None = None) -> Example:
    """A RULER prompt for `task` at max_seq_length `length`: at most length - answer_tokens(task) tokens, BOS
    included (meta["tokens"], the true length; meta["units"], the haystack size that fits). corpus: the essay
    haystack of the essay niah tasks; chat: None (RULER's "base") or a `tasks.chat_wrap` template."""
    family = _check(task)
    budget = length - TOKENS_TO_GENERATE[family]
    if budget < 16:
        raise TaskError(f"length={length} leaves no room for a {task} prompt after its {TOKENS_TO_GENERATE[family]} "
                        f"answer tokens; use a longer length")
    chat_wrap("", chat)  # an unknown chat template fails before any work
    try:
        if family == "niah":
            ids, text, answer, n, extra = _niah(tok, task, budget, rng, corpus, chat)
        elif family == "vt":
            ids, text, answer, n, extra = _vt(tok, budget, rng, chat)
        elif family == "cwe":
            ids, text, answer, n, extra = _cwe(tok, length, budget, rng, chat)
        else:
            ids, text, answer, n, extra = _fwe(tok, length, budget, rng, chat)
    except TaskError as e:  # the budget is the user's length less the answer: say both
        raise TaskError(f"RULER {task} at length={length} (a prompt budget of {budget} tokens after its "
                        f"{TOKENS_TO_GENERATE[family]} answer tokens): {e}") from None
    meta = {"task": "ruler", "subtask": task, "length": length, "budget": budget, "tokens": len(ids), "units": n,
            "chat": chat, **extra}
    if family == "niah" and NIAH[task].haystack == "essay":
        meta["corpus"] = corpus
    return Example(ids, text, answer, meta)


# ----------------------------------------------------------------------------- scoring


def postprocess(output: str) -> str:
    """evaluate.py's postprocess_pred: stripped, control characters turned into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", output.strip()).strip()


def string_match_all(output: str, references: Sequence[str]) -> float:
    """The fraction of the references found in the output, case-insensitive."""
    pred = postprocess(output).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the output, case-insensitive."""
    pred = postprocess(output).lower()
    return max(float(r.lower() in pred) for r in references)


def score(task: str, output: str, answers: Sequence[str]) -> float:
    """RULER's metric for the task on one example, in [0, 1]."""
    _check(task)
    if isinstance(answers, str) or not answers:
        raise TaskError(f"answers must be a non-empty list of strings, got {answers!r}")
    return {"string_match_all": string_match_all, "string_match_part": string_match_part}[METRIC[task]](output,
                                                                                                        answers)
