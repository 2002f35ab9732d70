"""The TPU planner: compiles the real step for a topology and accounts FLOPs through loops correctly."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from cream_jax import attention, flops, plan, sharding, tpu
from cream_jax import train_config as tc
from helpers import ROOT, cli_env

pytestmark = pytest.mark.tpu_compile  # every test here compiles for a TPU topology (libtpu)


def tiny_plan_config(**model):
    c = tc.load_config(ROOT / "configs" / "tiny_cream.py")
    c.model.update(model)
    c.model.num_hidden_layers = 3
    c.model.attention = "blockwise"
    c.model.attention_block_size = 32
    c.train.global_batch = 4
    c.mesh.update({"data": 1, "fsdp": -1, "tensor": 1})
    with c.unlocked():
        c.name = "tiny"
    return c


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_flop_accounting_through_scans_and_block_loops(remat):
    """The planner's cost (1- and 2-layer compiles) equals a compile with everything unrolled."""
    c = tiny_plan_config(remat=remat)
    p = plan.plan(c, "v5p-8")
    cfg = tc.model_config(c)
    mesh = sharding.make_mesh(dict(c.mesh), tpu.topology_devices("v5p-8"))
    with attention.unrolled_block_loops():
        full = plan.compile_step(c, cfg.replace(scan_layers=False), mesh).cost_analysis()["flops"]
    assert p.compiler_flops_per_step == pytest.approx(full, rel=0.01)
    if remat == "none":  # the trap: loop bodies counted once (once is enough)
        assert plan.compile_step(c, cfg, mesh).cost_analysis()["flops"] < 0.6 * full
    # model FLOPs (causal attention, no remat) vs what the compiler runs
    expected_overhead = (1.0, 1.15) if remat == "none" else (1.2, 1.5)
    assert expected_overhead[0] * 0.9 < p.remat_overhead < expected_overhead[1]
    assert p.fits and p.step_seconds > 0 and 0 < p.mfu < 1


@pytest.mark.slow
def test_splash_kernels_are_counted_as_compiled():
    """The Pallas kernel reports no cost, so the planner counts its calls in the compiled step: under full
    remat the forward kernel runs twice per layer, once when `save_attention` keeps its residuals."""
    plans = {}
    for remat in ("full", "save_attention"):
        c = tiny_plan_config(remat=remat)
        c.model.attention, c.model.attention_block_size = "splash", 128
        c.train.window = 256  # two blocks: 3 of the 4 block pairs are causal
        plans[remat] = plan.plan(c, "v5p-8")
    # 3 layers, each one forward, dq and dkv call, plus a second forward under full remat
    assert plans["full"].attention_kernel_calls == {"fwd": 6, "dq": 3, "dkv": 3}
    assert plans["save_attention"].attention_kernel_calls == {"fwd": 3, "dq": 3, "dkv": 3}
    # By hand: 3 layers x (QK^T, PV) x 3 causal block pairs x 2*128*128*head_dim(8) x 4 heads x 1 row per chip.
    forward_kernels = 3 * 2 * 3 * (2 * 128 * 128 * 8) * 4 * 1
    saved = plans["full"].compiler_flops_per_step - plans["save_attention"].compiler_flops_per_step
    assert saved == pytest.approx(forward_kernels, rel=0.01)
    assert plans["save_attention"].temporaries_gib > plans["full"].temporaries_gib


@pytest.mark.slow
def test_cli_prints_the_table_and_writes_json(tmp_path):
    env = cli_env()
    run = subprocess.run([sys.executable, "-m", "cream_jax.plan", f"--config={ROOT / 'configs' / 'tiny_cream.py'}",
                          "--topology=v5e-4", "--config.train.global_batch=4", "--config.model.remat=full",
                          f"--json={tmp_path / 'plan.json'}",
                          f"--dump_hlo={tmp_path / 'step.hlo'}", "--search=full"], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "| HBM total |" in out and "| est. MFU |" in out
    assert "fastest for tiny_cream: --config.model.remat=full --config.train.grad_accum=1" in out
    assert "searching tiny_cream: full, grad_accum=1 (the recipe's own plan)" in run.stderr  # not compiled again
    p, searched = json.loads((tmp_path / "plan.json").read_text())
    assert p["topology"] == "v5e-4" and p["chips"] == 4 and p["fits"] and p["role"] == "plan"
    assert searched["role"] == "search" and searched["remat"] == "full" and searched["step_seconds"] > 0
    assert "HloModule" in (tmp_path / "step.hlo").read_text()[:200]


def _small_chip_config():
    c = tiny_plan_config(remat="none")
    c.model.hidden_size, c.model.intermediate_size = 128, 512
    c.train.window, c.train.target_length = 512, 2048
    return c


@pytest.mark.slow
def test_suggests_a_remat_policy_that_fits(monkeypatch):
    c = _small_chip_config()
    none = plan.plan(c, "v5p-8", per_device_batch=8, with_cost=False)
    c_full = c.copy_and_resolve_references()
    c_full.model.remat = "full"
    full = plan.plan(c_full, "v5p-8", per_device_batch=8, with_cost=False)
    assert full.temporaries_gib < none.temporaries_gib
    capacity = (full.total_gib + none.total_gib) / 2  # a chip on which only recomputation fits
    monkeypatch.setitem(flops.CHIPS, "v5p", flops.Chip(capacity, 459e12, ("TPU v5p",), 2765e9))
    remat, accum = plan.suggest(c, "v5p-8", per_device_batch=8)
    assert remat in ("save_proj", "save_attention", "full") and accum == 1


@pytest.mark.slow
def test_a_plan_that_does_not_fit_is_not_costed(monkeypatch):
    monkeypatch.setitem(flops.CHIPS, "v5p", flops.Chip(1e-6, 459e12, ("TPU v5p",), 2765e9))
    monkeypatch.setattr(plan, "_cost", lambda *a: pytest.fail("cost compiles for a step that cannot run"))
    c = tiny_plan_config()
    c.model.attention = "dot_product"
    p = plan.plan(c, "v5p-8")
    assert not p.fits and p.step_seconds is None and p.mfu is None


def test_search_keeps_the_global_batch_and_ranks_what_fits(monkeypatch):
    """The search's bookkeeping, on a stand-in for `plan` (the CLI test runs the real one): each policy at
    its fewest microbatches that fit, the global batch kept, choices the config rejects skipped, a policy
    that never fits last, the rest fastest first."""
    per_sequence_gib = {"none": 4.0, "save_dots": 3.0, "save_proj": 2.0, "save_attention": 20.0, "full": 1.0}
    speed = {"none": 1.0, "save_dots": 1.02, "save_proj": 1.1, "save_attention": 1.2, "full": 1.3}
    tried = []

    def fake_plan(c, topology, per_device_batch=None, dump_hlo=None, with_cost=True):
        assert per_device_batch is None and c.train.global_batch == 32  # kept, not changed per choice
        remat, accum = c.model.remat, c.train.grad_accum
        tried.append((remat, accum))
        if (remat, accum) == ("save_proj", 1) or (32 // accum) % 4:  # as the config check rejects
            raise tc.ConfigError("rejected")
        microbatch = 32 / accum / 4
        fits = per_sequence_gib[remat] * microbatch <= 10
        cost = speed[remat] * (1 + 0.01 * accum) if fits else None
        fields = {f.name: None for f in dataclasses.fields(plan.Plan)}
        return plan.Plan(**{**fields, "config": "x", "remat": remat, "grad_accum": accum, "fits": fits,
                            "global_batch": 32, "per_device_batch": 8.0, "seconds_per_trained_token_per_chip": cost})

    monkeypatch.setattr(plan, "plan", fake_plan)
    found = plan.search(tiny_plan_config(), "v5p-8", per_device_batch=8)
    assert [(p.remat, p.grad_accum) for p in found] == [
        ("none", 4), ("save_dots", 4), ("save_proj", 2), ("full", 1), ("save_attention", 8)]
    assert not found[-1].fits and all(p.fits for p in found[:-1])
    assert tried.count(("none", 1)) == tried.count(("save_attention", 8)) == 1 and ("full", 2) not in tried
    assert plan.override_flags(found[0]) == "--config.model.remat=none --config.train.grad_accum=4"
    with pytest.raises(tc.ConfigError, match="save_everything"):
        plan.search(tiny_plan_config(), "v5p-8", policies=("save_everything",))

    tried.clear()  # the recipe's own choice, already planned (by the CLI), is taken as it is
    own = dataclasses.replace(found[0], remat="full", grad_accum=1, seconds_per_trained_token_per_chip=0.5)
    searched = plan.search(tiny_plan_config(remat="full"), "v5p-8", per_device_batch=8, policies=("none", "full"),
                           planned=own)
    assert searched[0] is own and searched[1].remat == "none"
    assert tried == [("none", 1), ("none", 2), ("none", 4)]


@pytest.mark.slow
def test_a_step_the_compiler_refuses_for_hbm_is_a_plan_that_does_not_fit():
    """libtpu will not compile a step whose temporaries exceed HBM: the plan says it does not fit, with the
    temporaries the compiler named (so `suggest` goes on to the next choice instead of failing)."""
    c = tiny_plan_config(remat="none")
    c.model.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, head_dim=64)
    c.model.max_position_embeddings = c.train.window = c.train.target_length = 2048
    refused = plan.plan(c, "v5e-4", per_device_batch=64)
    assert not refused.fits and refused.temporaries_gib > 16 and refused.total_gib is None
    assert refused.step_seconds is None and any("refused the step" in note for note in refused.notes)


@pytest.mark.slow
def test_collective_matmul_loops_are_not_counted_once(tmp_path, monkeypatch):
    """On larger meshes (16 chips here) XLA runs all-gathered matmuls as loops over the shards (windowed
    einsum), whose bodies XLA's cost analysis counts once. The cost compiles run them as plain matmuls: the
    planner's FLOPs match a compile of the whole step with no loops at all."""
    c = tiny_plan_config(remat="full", hidden_size=256, intermediate_size=704, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128)
    c.model.attention_block_size = 128
    c.train.window, c.train.target_length, c.train.global_batch = 512, 2048, 32  # 2 rows on each of 16 chips
    p = plan.plan(c, "v5p-32", dump_hlo=str(tmp_path / "step.hlo"))
    step_hlo = (tmp_path / "step.hlo").read_text()
    assert any("windowed" in loop for loop in plan.while_loops(step_hlo))  # the step as it runs has them
    assert any(re.match(r"XLA runs \d+ matmuls of this step as collective matmuls", note) for note in p.notes)
    cfg = tc.model_config(c).replace(scan_layers=False)
    mesh = sharding.make_mesh(dict(c.mesh), tpu.topology_devices("v5p-32"))
    with attention.unrolled_block_loops():
        plain, plain_hlo = plan.compile_step_with_hlo(c, cfg, mesh, plan.COST_COMPILE_OPTIONS)
    assert not plan.while_loops(plain_hlo)
    assert p.compiler_flops_per_step == pytest.approx(plain.cost_analysis()["flops"], rel=0.01)

    # a loop left in a cost compile is an error (a compile that kept them stood in by the step's own HLO)
    monkeypatch.setattr(plan, "compile_step_with_hlo", lambda *args: (None, step_hlo))
    with pytest.raises(RuntimeError, match="windowed_dot_general.*counts once"):
        plan._cost(c, tc.model_config(c), mesh, 459e12)


@pytest.mark.slow
def test_v4_chips_are_one_device_each():
    """A v4 chip's two TensorCores run as one jax device ("megacore"), as on a real v4 slice: v4-8 is 4
    devices, and the planner compiles for it (`jax.make_mesh` refuses a device per TensorCore)."""
    assert len(tpu.topology_devices("v4-8")) == 4 and len(tpu.topology_devices("v4:2x2x2")) == 8
    p = plan.plan(tiny_plan_config(), "v4-8", with_cost=False)
    assert p.chips == 4 and p.fits and p.total_gib > 0


@pytest.mark.parametrize("name", ["v5p-7", "v5p", "tpu"])
def test_an_unknown_topology_names_the_known_ones(name):
    with pytest.raises(tpu.TopologyError, match=rf"unknown TPU topology '{name}': use one of .*'v5p-8'"):
        tpu.topology_devices(name)


# ----------------------------------------------------------------------------- evaluation (plan_eval)


def _gqa_eval_config(**overrides):
    """A small GQA model in bfloat16 for the TPU compiler: 16 query heads over 4 kv heads of 64."""
    from cream_jax.config import LlamaConfig

    fields = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=65536, dtype="bfloat16",
                  param_dtype="bfloat16", platform="tpu")
    return LlamaConfig(**{**fields, **overrides})


def test_prefill_chunk_temporaries_grow_linearly_in_the_cache_length():
    """The real prefill chunk program (generate.extend with the kernel, AOT for one v5e chip): for a fixed chunk, its
    temporaries grow linearly in the cache length from 8K to 64K slots, by no more than twice the cache's own
    bytes per slot (a copy of it would be once): no chunk x cache-length score matrix, which a plain
    softmax(q k^T) v over the cache, compiled beside it, shows."""
    from cream_jax import plan_eval

    # head_dim 128, as the 7-8B models: with 64 the TPU's default layout of the cache puts slots minor, and the
    # kernel's program copies the cache into its row-major layout and back per call (the planner counts them)
    cfg, chunk = _gqa_eval_config(head_dim=128), 512
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, tpu.topology_devices("v5e-1"))
    lengths = [8192, 16384, 32768, 65536]
    temps = [plan_eval.program_memory(cfg, mesh, 1, chunk, t, 512).temporaries for t in lengths]
    per_slot = [(b - a) / (t1 - t0) for a, b, t0, t1 in zip(temps, temps[1:], lengths, lengths[1:])]
    cache_per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, bf16
    assert all(-0.01 * cache_per_slot <= s <= 2 * cache_per_slot for s in per_slot), (temps, per_slot)
    assert max(per_slot) - min(per_slot) <= 0.25 * cache_per_slot, (temps, per_slot)  # equal increments

    import jax
    import jax.numpy as jnp

    def naive(q, k, v):  # the scores of every query against every slot, materialised
        s = jnp.einsum("chk,thk->hct", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("hct,thk->chk", jax.nn.softmax(s).astype(v.dtype), v)

    heads, k_dim = cfg.num_attention_heads, cfg.head_dim
    naive_temps = [tpu.memory(tpu.compile_for_tpu(naive, jax.ShapeDtypeStruct((chunk, heads, k_dim), jnp.bfloat16),
                                                  *[jax.ShapeDtypeStruct((t, heads, k_dim), jnp.bfloat16)] * 2,
                                                  topology="v5e-1")).temporaries for t in lengths[1:3]]
    assert (naive_temps[1] - naive_temps[0]) / lengths[1] > 4 * cache_per_slot  # such a program fails the check


def test_visited_blocks_follow_the_causal_chunks():
    from cream_jax import plan_eval

    assert plan_eval.visited_blocks(4096, 1024, 512) == [2, 4, 6, 8]
    assert plan_eval.visited_blocks(2048, 256, 512) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert plan_eval.visited_blocks(300, 100, 512) == [1, 1, 1]  # the block is at most the cache


def test_the_largest_batch_is_found_by_the_line_then_verified():
    """The search's bookkeeping on stand-in compiles: linear totals need the line's guess and one more
    compile; a total that is not linear still ends at n fits, n + step does not; a batch that never fits is 0."""
    from cream_jax import plan_eval

    def search(total, capacity, batch=1, step=1):
        compiled = []

        def measure(n):
            compiled.append(n)
            t = total(n)
            return plan_eval.Memory(0, None if t is None else t, 0)

        return plan_eval.largest_batch(measure, capacity, batch, step)[0], compiled

    assert search(lambda n: 10 + 3 * n, 100) == (30, [1, 2, 30, 31])
    assert search(lambda n: 10 + 3 * n, 100, batch=4, step=4) == (28, [4, 8, 28, 32])
    found, compiled = search(lambda n: 10 + 3 * n + n // 7 * 2, 100)
    assert found == 27 and 10 + 3 * 28 + 28 // 7 * 2 > 100 and len(compiled) <= 6
    assert search(lambda n: None if 2 * n > 100 else 2 * n, 100) == (50, [1, 2, 50, 51])  # refused past HBM
    assert search(lambda n: 200 * n, 100) == (0, [1])


def test_eval_cli_prints_the_table_and_writes_json(tmp_path):
    """`plan --eval` on a tiny recipe for one v5e chip: the memory table, the estimates beside their floors,
    where the time goes, and the same figures as JSON, all positive."""
    run = subprocess.run([sys.executable, "-m", "cream_jax.plan", "--eval",
                          f"--config={ROOT / 'configs' / 'tiny_cream.py'}", "--topology=v5e-1", "--length=65536",
                          "--chunk=2048", "--nomax_batch", f"--json={tmp_path / 'eval.json'}"], env=cli_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for row in ("| HBM KV cache |", "| HBM total: prefill chunk |", "| prefill: est. / floor |",
                "| decode: est. / floor |", "| attention | Pallas kernel (modeled) |",
                "| prefill: attention kernel: steps that compute | 16640 |",
                "| decode: attention kernel: steps that compute | 128 |"):
        assert row in run.stdout, run.stdout
    p = json.loads((tmp_path / "eval.json").read_text())
    assert p["topology"] == "v5e-1" and p["length"] == 65536 and p["chunk"] == 2048 and p["fits"]
    assert p["prefill_chunks"] == 32 and p["decode_blocks_visited"] == 64 and p["max_batch"] is None
    assert p["attention"] == "kernel" and p["block"] == 1024 and p["prefill_xla_seconds"] > 0
    from cream_jax import plan_eval

    text = plan_eval.page([plan_eval.EvalPlan(**p)], "python -m cream_jax.plan --eval --page=x.md")
    assert f"| tiny_cream, 65536 on v5e-1 | {p['prefill_ratio']:.2f}x: " in text
    assert "## tiny_cream: 65536 slots on v5e-1" in text and "| prefill: attention kernel: steps that compute |" in text
    for key in ("weights_gib", "cache_gib", "prefill_total_gib", "decode_total_gib", "prefill_seconds",
                "prefill_flop_floor_seconds", "prefill_ratio", "decode_ms", "decode_hbm_floor_ms", "decode_ratio"):
        assert p[key] > 0, key
    cfg = tc.model_config(tc.load_config(ROOT / "configs" / "tiny_cream.py"))
    cache = 2 * cfg.num_hidden_layers * 65536 * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v in bfloat16
    assert p["cache_gib"] == pytest.approx(cache / 2**30)
    assert p["compiler_flops_prefill"] >= p["model_flops_prefill"]  # whole blocks, masked or not
