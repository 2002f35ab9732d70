"""The retrieval tasks: prompts equal to the reference generators' output (fixtures made by running PoSE's,
LongChat's and lost-in-the-middle's own code), prompts as one encoding of their text with the 32000-piece
tokenizer, the length-driven counts, and the scorers against the references' definitions."""

import json
import re
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest

from cream_jax import tasks
from cream_jax.data import tokenizer as tok_lib

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def llama_tok():
    return tok_lib.resolve("llama2-32k")


def fixture(name: str) -> dict:
    data = json.loads((FIXTURES / name).read_text())
    assert data["source"] and data["inputs"] and data["cases"]
    return data


def assert_one_encoding(tok, ex: tasks.Example):
    """The ids are the text's own encoding, with no stray whitespace pieces and no double spaces."""
    assert ex.ids == tasks.encode(tok, ex.text) and ex.meta["tokens"] == len(ex.ids)
    assert "  " not in ex.text
    space = tok.sp.PieceToId("\u2581")  # the lone whitespace piece (29871 in Llama's model, 28705 in this one)
    for prev, cur in zip(ex.ids, ex.ids[1:]):
        if cur == space:
            piece = tok.sp.IdToPiece(prev)
            assert not piece.endswith("\u2581") and piece not in ("<0x0A>", "<0x20>", "<0x09>"), piece


# ----------------------------------------------------------------------------- reference equality


def test_passkey_text_equals_pose():
    for case in fixture("passkey_pose.json")["cases"]:
        text = tasks.passkey_text(case["n_garbage_prefix"], case["n_garbage_suffix"], case["pass_key"])
        assert text == case["prompt"], case["seed"]


def test_lines_text_equals_longchat():
    for case in fixture("lines_longchat.json")["cases"]:
        records = [(name, int(number)) for name, number in case["records"]]
        asked = case["random_idx"][1]
        assert records[asked][0] == case["random_idx"][0] and records[asked][1] == case["expected_number"]
        text = tasks.lines_text(records, asked)
        assert text == case["prompt"]
        assert tasks.chat_wrap(text, "vicuna") == case["vicuna_prompt"]
        assert tasks.chat_wrap(text, "llama2") == case["llama2_prompt"]


def test_kv_text_equals_lost_in_the_middle():
    for case in fixture("kv_lost_in_the_middle.json")["cases"]:
        pairs = [tuple(p) for p in deepcopy(case["ordered_kv_records"])]
        gold = pairs.pop(pairs.index((case["key"], case["value"])))
        pairs.insert(case["gold_index"], gold)  # as CREAM's get_results.py moves the gold record
        assert pairs[case["gold_index"]] == (case["key"], case["value"]) and len(pairs) == case["num_keys"]
        text = tasks.kv_text(pairs, case["gold_index"], query_aware=case["query_aware_contextualization"])
        assert tasks.chat_wrap(text, case["chat"]) == case["prompt"]


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("length", [1024, 4096])
def test_passkey_prompts(llama_tok, length):
    rng = np.random.default_rng(0)
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        ex = tasks.passkey(llama_tok, length, depth, rng)
        assert_one_encoding(llama_tok, ex)
        assert length - 30 < ex.meta["tokens"] <= length  # one more filler repetition (24 tokens) does not fit
        key, n = int(ex.answer), ex.meta["n_total"]
        assert 1 <= key <= 50000 and ex.meta["n_prefix"] == round(depth * n)
        assert ex.text == tasks.passkey_text(round(depth * n), n - round(depth * n), key)
        assert llama_tok.decode(ex.ids[ex.meta["needle_start"]:]).startswith(f"The pass key is {key}.")
        where = ex.meta["needle_start"] / ex.meta["tokens"]
        assert abs(where - depth) < 0.06, (depth, where)
    wrapped = tasks.passkey(llama_tok, 1024, 0.5, np.random.default_rng(1), chat="llama2")
    assert_one_encoding(llama_tok, wrapped)
    assert wrapped.text.startswith("[INST] There is an important info") and wrapped.text.endswith(" [/INST]")


def test_passkey_spaced_style_and_key_range(llama_tok):
    """The demo's variant: every sentence joined by one space, keys from the range given; still one encoding."""
    ex = tasks.passkey(llama_tok, 512, 0.5, np.random.default_rng(2), key_range=(10000, 99999), style="spaced")
    assert_one_encoding(llama_tok, ex)
    key, n = int(ex.answer), ex.meta["n_total"]
    assert 10000 <= key <= 99999 and "\n" not in ex.text
    assert ex.text == tasks.passkey_text(round(0.5 * n), n - round(0.5 * n), key, "spaced")
    assert f"again. The pass key is {key}. Remember it. {key} is the pass key. The grass" in ex.text
    with pytest.raises(tasks.TaskError, match="unknown passkey style 'glued'; allowed: pose, spaced"):
        tasks.passkey(llama_tok, 512, 0.5, np.random.default_rng(2), style="glued")
    with pytest.raises(tasks.TaskError, match=r"key_range=\(5, 1\)"):
        tasks.passkey(llama_tok, 512, 0.5, np.random.default_rng(2), key_range=(5, 1))


def test_lines_prompts(llama_tok):
    ex = tasks.lines(llama_tok, 40, np.random.default_rng(1), index=7)
    assert_one_encoding(llama_tok, ex)
    records = re.findall(r"line ([a-z]+-[a-z]+): REGISTER_CONTENT is <(\d+)>\n", ex.text)
    asked = re.search(r"in line ([a-z]+-[a-z]+)\? I need the number\.$", ex.text).group(1)
    assert len(records) == ex.meta["lines"] == 40 and len({n for n, _ in records}) == 40
    assert records[7] == (asked, ex.answer) and ex.meta["index"] == 7
    adjectives = [name.split("-")[0] for name, _ in records]
    assert len(set(adjectives)) == 40  # LongChat's scheme while there are adjectives enough: one per line
    again = tasks.lines(llama_tok, 40, np.random.default_rng(1), index=7)
    assert again.text == ex.text  # reproducible by seed
    vicuna = tasks.lines(llama_tok, 10, np.random.default_rng(2), chat="vicuna")
    assert_one_encoding(llama_tok, vicuna)
    assert vicuna.text.startswith(tasks.VICUNA_SYSTEM + " USER: Below is") and vicuna.text.endswith(" ASSISTANT:")


def test_kv_prompts(llama_tok):
    rng = np.random.default_rng(2)
    for index in tasks.kv_gold_indices(10):
        ex = tasks.kv(llama_tok, 10, index, rng)
        assert_one_encoding(llama_tok, ex)
        pairs = re.findall(r'"([0-9a-f-]{36})": "([0-9a-f-]{36})"', ex.text)
        assert len(pairs) == ex.meta["keys"] == 10 and ex.meta["index"] == index
        key, value = pairs[index]
        assert value == ex.answer and ex.text.count(value) == 1 and ex.text.count(key) == 2
        assert ex.text.endswith(f'Key: "{key}"\nCorresponding value:')
        assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u)
                   for pair in pairs for u in pair)  # uuid4 strings
    aware = tasks.kv(llama_tok, 5, 1, rng, query_aware=True, chat="llama2")
    assert_one_encoding(llama_tok, aware)
    assert aware.text.startswith("[INST] ") and aware.text.count(aware.text.split('Key: "')[1][:36]) == 3


def test_kv_gold_indices():
    assert tasks.kv_gold_indices(75) == [0, 18, 37, 54, 74]
    assert tasks.kv_gold_indices(140) == [0, 34, 69, 104, 139]
    assert tasks.kv_gold_indices(300) == [0, 74, 149, 224, 299]
    assert tasks.kv_gold_indices(2) == [0, 1] and tasks.kv_gold_indices(5) == [0, 1, 2, 3, 4]
    with pytest.raises(tasks.TaskError, match="keys=1"):
        tasks.kv_gold_indices(1)


@pytest.mark.parametrize("length", [2048, 8192])
def test_counts_for_length(llama_tok, length):
    n = tasks.lines_for_length(llama_tok, length)
    k = tasks.kv_keys_for_length(llama_tok, length, chat="vicuna")
    for seed in range(3):
        rng = np.random.default_rng(seed)
        assert 0.9 * length < tasks.lines(llama_tok, n, rng).meta["tokens"] <= length
        assert 0.9 * length < tasks.kv(llama_tok, k, k - 1, rng, chat="vicuna").meta["tokens"] <= length


def test_lines_reach_128k_fast(llama_tok):
    start = time.perf_counter()
    n = tasks.lines_for_length(llama_tok, 131072)
    ex = tasks.lines(llama_tok, n, np.random.default_rng(0))
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    assert 0.99 * 131072 < ex.meta["tokens"] <= 131072 and ex.meta["lines"] == n > 5000
    assert ex.ids == tasks.encode(llama_tok, ex.text)
    names = tasks.line_names(20000, np.random.default_rng(0))  # 256K tokens' worth: distinct pairs
    assert len(set(names)) == 20000 and all(re.fullmatch(r"[a-z]+-[a-z]+", x) for x in names)


def test_fit_is_exact_and_few_probes(llama_tok):
    records = tasks.line_records(3000, np.random.default_rng(0))
    built = []

    def build(n):
        built.append(n)
        return tasks.lines_text(records[:n], 0)

    n, ids, text = tasks.fit(llama_tok, build, 30000, lo=1, hi=len(records))
    assert len(ids) <= 30000 < len(tasks.encode(llama_tok, tasks.lines_text(records[:n + 1], 0)))
    assert ids == tasks.encode(llama_tok, text) and len(set(built)) <= 8, built


def test_errors(llama_tok, monkeypatch):
    with pytest.raises(tasks.TaskError, match="too short for a passkey prompt"):
        tasks.passkey(tok_lib.resolve("botchan-bpe-1000"), 40, 0.5, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="depth=1.5"):
        tasks.passkey(llama_tok, 1024, 1.5, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="index=10 is outside the 10 keys"):
        tasks.kv(llama_tok, 10, 10, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="index=3 is outside the 3 lines"):
        tasks.lines(llama_tok, 3, np.random.default_rng(0), index=3)
    with pytest.raises(tasks.TaskError, match="too short for a Lines prompt"):
        tasks.lines_for_length(llama_tok, 50)
    with pytest.raises(tasks.TaskError, match="allowed: llama2, vicuna"):
        tasks.chat_wrap("x", "chatml")
    assert tasks.chat_wrap("x", None) == "x"
    monkeypatch.setattr(tasks, "line_words", lambda: (("red", "big"), ("cat", "dog")))
    assert len(set(tasks.line_names(4, np.random.default_rng(0)))) == 4
    with pytest.raises(tasks.TaskError, match="num_lines=5 exceeds the 4 distinct"):
        tasks.lines(llama_tok, 5, np.random.default_rng(0))


# ----------------------------------------------------------------------------- scoring


def test_best_subspan_em():
    """lost-in-the-middle's metric: SQuAD normalization (case, punctuation, articles, whitespace), then a
    normalized ground truth inside the normalized prediction."""
    assert tasks.normalize_answer("The  Quick, brown FOX!\n") == "quick brown fox"
    assert tasks.normalize_answer("an apple a day") == "apple day"
    assert tasks.best_subspan_em("It was the Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert tasks.best_subspan_em("Paris", ["London", "paris!"]) == 1.0
    assert tasks.best_subspan_em("the Tower", ["Eiffel Tower"]) == 0.0
    v = "b9bc9b21-dd84-4c78-b86a-b94efb7f493f"
    assert tasks.best_subspan_em(f'"{v.replace("-", "")}"', [v]) == 1.0  # punctuation goes on both sides


def test_score():
    assert tasks.score("passkey", " 58213. Remember", "58213") == 1.0
    assert tasks.score("passkey", " 058213", "58213") == 1.0  # compared as integers, as PoSE does
    assert tasks.score("passkey", " 5821 3", "58213") == 0.0 and tasks.score("passkey", " no idea", "58213") == 0.0
    assert tasks.score("lines", " <4419>.", "4419") == 1.0 and tasks.score("lines", " 44190", "4419") == 0.0
    assert tasks.score("lines", " Line 7 is <4419>", "4419") == 0.0  # the first integer, as CREAM parses
    v = "b9bc9b21-dd84-4c78-b86a-b94efb7f493f"
    assert tasks.score("kv", ' "' + v.upper() + '"}', v) == 1.0  # lost-in-the-middle: value.lower() in answer
    assert tasks.score("kv", v[:-1] + '0"', v) == 0.0 and tasks.score("kv", v.replace("-", ""), v) == 0.0
    assert [tasks.answer_tokens(t) for t in tasks.TASKS] == [10, 35, 50]
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.score("qa", "x", "x")
    with pytest.raises(tasks.TaskError, match="unknown task"):
        tasks.answer_tokens("qa")
