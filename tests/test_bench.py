"""The benchmark's --quick run: every section present with positive numbers, the attention backends'
compiled memory scaling (blockwise ~linear in S, dot_product ~quadratic), and `--sections` keeping the
sections it does not run."""

import json

import numpy as np
import pytest

from cream_jax import bench, bench_generation


def _slope(rows, backend):
    rows = sorted((r["S"], r["temporaries_mib"]) for r in rows if r["backend"] == backend)
    S, mib = np.array(rows).T
    return np.polyfit(np.log(S), np.log(mib), 1)[0]


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_quick_run(tmp_path, monkeypatch):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())

    train = r["train"]
    assert {(x["framework"], x["positions"]) for x in train} == {("ours", "plain"), ("transformers", "plain")}
    assert {x["attention"] for x in train if x["framework"] == "ours"} == set(bench.BACKENDS)
    assert {x["setting"] for x in train} == {"", *bench.SETTINGS}
    assert {(x["framework"], x["setting"]) for x in train if x["setting"]} == {
        (f, s) for s, (_, frameworks) in bench.SETTINGS.items() for f in frameworks}
    for x in train:
        assert "error" not in x, x
        for key in ("tokens_per_s", "median_s", "peak_mib", "baseline_mib", "gflops_per_s"):
            assert x[key] > 0, (key, x)
        assert x["peak_mib"] >= x["baseline_mib"]
    for section, keys in (("ours_vs_transformers", ("ours_tokens_per_s", "transformers_tokens_per_s", "ratio")),
                          ("cream_overhead", ("plain_median_s", "cream_median_s")),
                          ("settings", ("default_tokens_per_s", "setting_tokens_per_s", "setting_steady_peak_mib"))):
        assert r[section], section
        for x in r[section]:
            assert all(x[k] > 0 for k in keys), (section, x)
    shared = {"", "GLIBC_TUNABLES=" + bench.HEAP_REUSE}
    assert {x["setting"] for x in r["ours_vs_transformers"]} == shared
    assert {x["setting"] for x in r["cream_overhead"]} == shared
    for x in r["cream_overhead"]:
        assert x["pairs"] == bench.QUICK.pairs and len(x["plain_s"]) == len(x["cream_s"]) == x["pairs"]
        low, high = x["overhead_pct_range"]
        assert np.isfinite(x["overhead_pct"]) and low <= x["overhead_pct"] <= high

    attention = r["attention"]
    assert {(x["backend"], x["S"]) for x in attention} == {
        (b, S) for b in bench.BACKENDS for S in bench.QUICK.attn_lengths}
    assert all(x["temporaries_mib"] > 0 for x in attention)
    timed = [x for x in attention if "cpu_median_s" in x]
    assert {x["backend"] for x in timed} == set(bench.BACKENDS)
    assert all(x["cpu_median_s"] > 0 and x["cpu_peak_mib"] > 0 for x in timed)
    assert _slope(attention, "blockwise") < 1.3
    assert _slope(attention, "dot_product") > 1.7

    generation, sizes = r["generation"], bench_generation.QUICK
    assert {(x["S"], x["batch"], x["framework"]) for x in generation["rows"]} == {
        (S, B, f) for S, B in sizes.rows for f in bench_generation.FRAMEWORKS}
    for x in generation["rows"]:
        assert "error" not in x, x
        for key in ("prefill_s", "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s", "peak_mib"):
            assert x[key] > 0, (key, x)
        assert x["prefill"]["first_call_s"] > 0 and x["decode"]["first_call_s"] > 0
        assert x["prefill"]["n"] >= sizes.min_calls and x["decode"]["n"] >= sizes.min_calls
        assert x["peak_mib"] >= x["baseline_mib"]
    assert {(x["S"], x["batch"]) for x in generation["ratios"]} == set(sizes.rows)
    for x in generation["ratios"]:
        assert x["prefill_ratio"] > 0 and x["decode_ratio"] > 0 and 0 <= x["tokens_equal"] <= 1
        assert x["tokens_compared"] == x["batch"] * sizes.new_tokens

    md = (tmp_path / "bench.md").read_text()
    assert "| config | framework | attention |" in md and "| backend | S |" in md
    assert "ours / transformers" in md.lower()
    assert "## Generation" in md and "| S | batch | prefill ours / transformers |" in md

    # --sections generation: the other sections' results stay as they were, bench.md shows them all again
    again = {**generation, "ratios": [{**x, "decode_ratio": 123.0} for x in generation["ratios"]]}
    monkeypatch.setattr(bench_generation, "bench_generation", lambda sizes: again)
    assert bench.main(["--quick", "--sections", "generation", "--out", str(tmp_path), "--notes", "again"]) == 0
    merged = json.loads((tmp_path / "bench.json").read_text())
    assert {k: v for k, v in merged.items() if k not in ("generation", "meta")} == {
        k: v for k, v in r.items() if k not in ("generation", "meta")}
    assert merged["generation"] == again and merged["meta"]["sections"]["generation"]["notes"] == "again"
    assert merged["meta"]["sections"]["train"] == r["meta"]["sections"]["train"]
    md = (tmp_path / "bench.md").read_text()
    assert "| config | framework | attention |" in md and "| 123.00 |" in md and "Notes (generation): again" in md
    assert bench.main(["--sections", "generation", "--out", str(tmp_path)]) == 2  # full results into --quick ones
    assert json.loads((tmp_path / "bench.json").read_text()) == merged
