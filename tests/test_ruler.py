"""RULER's synthetic tasks: templates equal to RULER's own composition (tests/fixtures/ruler_reference.json, made by
running NVIDIA/RULER's functions on fixed inputs), prompts that fill their budget at 4K-128K tokens, and metrics."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from cream_jax import ruler, tasks
from cream_jax.data import tokenizer as tok_lib

REF = json.loads((Path(__file__).parent / "fixtures" / "ruler_reference.json").read_text())
CHAT = {"base": None, "meta-chat": "llama2"}  # RULER's model templates as ours


@pytest.fixture(scope="module")
def tok():
    return tok_lib.resolve("llama2-32k")


def cases(kind):
    return pytest.mark.parametrize("case", REF[kind], ids=[c["name"] for c in REF[kind]])


# ----------------------------------------------------------------------------- RULER's templates


def test_constants_are_rulers():
    c = REF["constants"]
    pairs = {"niah": (ruler.NIAH_TEMPLATE, ruler.NIAH_ANSWER_PREFIX), "variable_tracking": (ruler.VT_TEMPLATE,
             ruler.VT_ANSWER_PREFIX), "common_words_extraction": (ruler.CWE_TEMPLATE, ruler.CWE_ANSWER_PREFIX),
             "freq_words_extraction": (ruler.FWE_TEMPLATE, ruler.FWE_ANSWER_PREFIX)}
    for name, (template, prefix) in pairs.items():
        assert (template, prefix) == (c["tasks"][name]["template"], c["tasks"][name]["answer_prefix"])
        family = {"variable_tracking": "vt", "common_words_extraction": "cwe", "freq_words_extraction": "fwe"}
        assert ruler.TOKENS_TO_GENERATE[family.get(name, name)] == c["tasks"][name]["tokens_to_generate"]
        for model_template, chat in CHAT.items():
            assert ruler.compose(template, prefix, chat) == c["templates"][model_template].format(
                task_template=template) + prefix
    assert ruler.NEEDLE == c["needle"] and list(ruler.DEPTHS) == c["depths"]
    assert ruler.NOISE == REF["niah"][0]["inputs"]["filler"][0]


def test_task_arguments_are_synthetic_yaml():
    yaml = REF["constants"]["synthetic_yaml"]
    assert ruler.TASKS == tuple(t for t in yaml if not t.startswith("qa"))
    for task, cfg in ruler.NIAH.items():
        args = yaml[task]["args"]
        assert (cfg.haystack, cfg.type_k, cfg.type_v, cfg.num_k, cfg.num_v, cfg.num_q) == (
            args["type_haystack"], args["type_needle_k"], args["type_needle_v"], args["num_needle_k"],
            args["num_needle_v"], args["num_needle_q"])
    assert yaml["vt"]["args"] == {"type_haystack": "noise", "num_chains": ruler.VT_CHAINS, "num_hops": ruler.VT_HOPS}
    assert yaml["cwe"]["args"] == {"freq_cw": ruler.CWE_FREQ, "freq_ucw": ruler.CWE_FREQ_UNCOMMON,
                                   "num_cw": ruler.CWE_NUM_COMMON}
    assert yaml["fwe"]["args"] == {"alpha": ruler.FWE_ALPHA}
    metric = REF["constants"]["metrics"]
    for task in ruler.TASKS:
        assert ruler.METRIC[task] == metric[yaml[task]["task"]]
        assert ruler.answer_tokens(task) == REF["constants"]["tasks"][yaml[task]["task"]]["tokens_to_generate"]


@cases("niah")
def test_niah_text_is_rulers(case):
    cfg, x = case["config"], case["inputs"]
    needles = [ruler.niah_needle(cfg["type_needle_v"], k, v) for k, vs in zip(x["keys"], x["values"]) for v in vs]
    assert sorted(needles) == sorted(x["needles"])
    if cfg["type_haystack"] == "essay":
        words = " ".join(x["sentences"]).split()
        assert ruler.split_sentences(words) == x["sentences"]  # our splitter agrees on these
        context = ruler.essay_context(x["sentences"], x["needles"], x["depths"])
    else:
        context = ruler.lines_context(x["filler"], x["needles"], x["indexes"])
    text = ruler.niah_prompt(context, x["queries"], cfg["type_needle_v"], cfg["num_needle_v"],
                             CHAT[case["model_template"]])
    assert text == case["text"]
    assert [v for q in x["queries"] for v in x["values"][x["keys"].index(q)]] == case["answers"]


@cases("vt")
def test_vt_text_is_rulers(case):
    x, chat = case["inputs"], CHAT[case["model_template"]]
    if "example" in x:
        e = x["example"]
        example = ruler.vt_example(ruler.vt_context(e["num_noise"], [ruler.vt_chain(e["names"], e["value"])],
                                                    [e["positions"]]), e["value"], e["names"])
        context = ruler.vt_context(x["num_noise"], [ruler.vt_chain(x["names"], x["value"])], [x["positions"]])
        assert ruler.vt_prompt(context, x["value"], len(x["names"]), example, chat) == case["text"]
        assert case["answers"] == x["names"]
    else:
        chains = [ruler.vt_chain(names, v) for names, v in zip(x["chains"], x["values"])]
        context = ruler.vt_context(x["num_noise"], chains, x["positions"])
        assert ruler.vt_prompt(context, x["values"][0], len(x["chains"][0]), "", chat) == case["text"]


@cases("cwe")
def test_cwe_text_is_rulers(case):
    x = case["inputs"]
    (shot_n, shot_f, shot_u), (f, u) = ruler.cwe_sizes(x["max_seq_length"])
    assert len(x["shot_words"]) == shot_n
    n = ruler.CWE_NUM_COMMON
    assert ruler.cwe_repeats(x["shot_words"][:n], x["shot_words"][n:], shot_f, shot_u) == x["shot_before"]
    assert ruler.cwe_repeats(x["words"][:n], x["words"][n:], f, u) == x["before"]
    text = ruler.cwe_prompt(x["list"], [(x["shot_list"], x["shot_words"][:n])], CHAT[case["model_template"]])
    assert text == case["text"]
    assert case["answers"] == x["words"][:n]


@cases("fwe")
def test_fwe_text_is_rulers(case):
    x = case["inputs"]
    assert ruler.fwe_words(x["vocab"], x["num_words"], x["alpha"]) == x["before"]
    assert ruler.fwe_prompt(x["words"], CHAT[case["model_template"]]) == case["text"]
    assert case["answers"] == x["vocab"][1:4]


# ----------------------------------------------------------------------------- metrics


def test_metrics_are_rulers():
    for c in REF["metrics"]["cases"]:
        assert ruler.string_match_all(c["pred"], c["refs"]) == pytest.approx(c["string_match_all"], abs=1e-4)
        assert ruler.string_match_part(c["pred"], c["refs"]) == pytest.approx(c["string_match_part"], abs=1e-4)


def test_score_by_rulers_definition():
    refs = ["1234567", "7654321", "8888888", "9999999"]
    assert ruler.score("niah_multivalue", " 1234567, 7654321 and 1111111.", refs) == 0.5  # the fraction found
    assert ruler.score("vt", "VAR abcde, VAR FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0  # case-insensitive
    assert ruler.score("cwe", "", ["x"]) == 0.0
    assert ruler.score("fwe", "\x00zz", ["zz"]) == 1.0  # control characters become newlines, as RULER's
    assert ruler.string_match_part("only b here", ["a", "b"]) == 1.0
    assert ruler.string_match_part("nothing", ["a", "b"]) == 0.0
    with pytest.raises(tasks.TaskError, match="non-empty list"):
        ruler.score("vt", "x", [])
    with pytest.raises(tasks.TaskError, match="allowed: niah_single_1"):
        ruler.score("qa_1", "x", ["x"])


# ----------------------------------------------------------------------------- sentences of the essay haystack


def test_sentence_rule():
    assert ruler.ends_sentence("said.") and ruler.ends_sentence('again!"') and ruler.ends_sentence("so?)")
    assert not ruler.ends_sentence("Mr.") and not ruler.ends_sentence('"Mrs.') and not ruler.ends_sentence("J.")
    assert not ruler.ends_sentence("said,") and not ruler.ends_sentence("1811")
    hay = ruler.essay("austen")
    for n in (1, 57, 1000, 12345):  # a prefix splits as the corpus does
        assert hay.first(n) == ruler.split_sentences(hay.words[:n])
    small = ruler.Essay('Mr. Bennet came. "Yes!" she said'.split())  # repeated past its end, as RULER repeats
    assert small.first(10) == ["Mr. Bennet came.", '"Yes!"', "she said Mr. Bennet came.", '"Yes!"']


# ----------------------------------------------------------------------------- prompts at a budget


def check_example(tok, ex, task, length):
    budget = length - ruler.answer_tokens(task)
    assert ex.ids == tasks.encode(tok, ex.text)
    assert ex.meta["tokens"] == len(ex.ids) <= budget
    assert budget - len(ex.ids) <= max(0.01 * budget, 80)  # within 1 % or one haystack unit (a uuid needle)
    assert (ex.meta["task"], ex.meta["subtask"], ex.meta["length"]) == ("ruler", task, length)
    text = ex.text
    if task in ruler.NIAH:
        cfg = ruler.NIAH[task]
        for q in ex.meta["queries"]:
            assert q in ex.meta["keys"]
        values = iter(ex.answer)
        for q in ex.meta["queries"]:
            for _ in range(cfg.num_v):
                assert ruler.niah_needle(cfg.type_v, q, next(values)) in text
        assert len(ex.answer) == cfg.num_q * cfg.num_v
        assert text.endswith(" mentioned in the provided text " + ("is" if len(ex.answer) == 1 else "are"))
    elif task == "vt":
        names = ex.answer
        assert len(names) == ruler.VT_HOPS + 1
        assert f"\nVAR {names[0]} = {ex.meta['value']}\n" in text
        for a, b in zip(names, names[1:]):
            assert f"\nVAR {b} = VAR {a} \n" in text
        assert text.endswith(f"{len(names)} variables are assigned the value {ex.meta['value']}, they are: ")
    elif task == "cwe":
        main = text[text.rindex("Below is a numbered list"):]
        counts = {w: main.count(f". {w} ") + main.count(f". {w}\n") for w in ex.answer}
        freq = ruler.cwe_sizes(length)[1][0]
        assert set(counts.values()) == {freq}, counts
    else:
        words = text[text.index("coded words. ") + 13:text.index("\nQuestion:")].split(" ")
        top = sorted(set(words), key=words.count, reverse=True)
        assert top[0] == "..." and top[1:4] == ex.answer
        assert words.count(top[3]) > words.count(top[4])


@pytest.mark.slow
@pytest.mark.parametrize("length", [4096, 32768, 131072])
def test_every_task_fills_its_budget(tok, length):
    times = {}
    for i, task in enumerate(ruler.TASKS):
        start = time.perf_counter()
        ex = ruler.build(tok, task, length, np.random.default_rng(i))
        times[task] = time.perf_counter() - start
        check_example(tok, ex, task, length)
    slowest = max(times, key=times.get)
    assert times[slowest] < 15, times  # a few seconds each at 128K tokens, on one busy core


def test_deterministic_for_a_seed(tok):
    for task in ruler.TASKS:
        a, b = (ruler.build(tok, task, 4096, np.random.default_rng(7)) for _ in range(2))
        assert (a.ids, a.answer, a.meta) == (b.ids, b.answer, b.meta)
        assert ruler.build(tok, task, 4096, np.random.default_rng(8)).text != a.text


def test_llama2_chat_and_another_corpus(tok):
    ex = ruler.build(tok, "niah_single_2", 8192, np.random.default_rng(0), corpus="kjv", chat="llama2")
    check_example(tok, ex, "niah_single_2", 8192)
    assert ex.text.startswith("[INST] A special magic number is hidden")
    assert "[/INST] The special magic number for " in ex.text and "the LORD" in ex.text
    ex = ruler.build(tok, "cwe", 2048, np.random.default_rng(0), chat="llama2")  # RULER's short lists
    check_example(tok, ex, "cwe", 2048)
    assert ex.text.count("[INST] Below is a numbered list") == 2


def test_errors_name_the_fix(tok, monkeypatch):
    with pytest.raises(tasks.TaskError, match="unknown RULER task 'niah'.*allowed: niah_single_1, .*fwe"):
        ruler.build(tok, "niah", 4096, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="use a longer length"):
        ruler.build(tok, "niah_single_1", 200, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="use a longer length"):
        ruler.build(tok, "vt", 40, np.random.default_rng(0))
    with pytest.raises(tasks.TaskError, match="unknown chat template"):
        ruler.build(tok, "vt", 4096, np.random.default_rng(0), chat="alpaca")
    monkeypatch.setattr(ruler, "cwe_words", lambda: tuple(f"w{i}" for i in range(60)))
    with pytest.raises(tasks.TaskError, match="more than the 60 distinct words.*use a shorter length"):
        ruler.build(tok, "cwe", 32768, np.random.default_rng(0))
