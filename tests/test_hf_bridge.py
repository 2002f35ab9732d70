"""HF -> ours -> HF round trips, sharded export, tokenizer export, and clear errors on bad directories."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

import cream_jax
from cream_jax.hf import INDEX_FILE, SINGLE_FILE, HFFormatError, config_from_hf, config_to_hf
from helpers import assert_bit_identical, random_hf_llama, read_all


CONFIGS = {
    "gqa": {},
    "tied_mqa": dict(tie_word_embeddings=True, num_key_value_heads=1),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=1024),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", sorted(CONFIGS))
@pytest.mark.parametrize("shard_bytes", [None, 40_000])
def test_round_trip_bit_identical(tmp_path, case, shard_bytes):
    random_hf_llama(tmp_path / "hf", **CONFIGS[case])
    if shard_bytes:  # re-save the source sharded too, so import reads an index
        src = cream_jax.load_hf(tmp_path / "hf", progress=False)
        cream_jax.save_hf(src, tmp_path / "hf_sharded", max_shard_bytes=shard_bytes, progress=False)
        source = tmp_path / "hf_sharded"
        assert (source / INDEX_FILE).exists() and not (source / SINGLE_FILE).exists()
    else:
        source = tmp_path / "hf"
    ours = cream_jax.load_hf(source, progress=False)
    cream_jax.save_hf(ours, tmp_path / "out", max_shard_bytes=shard_bytes or 2**40, progress=False)
    assert_bit_identical(read_all(tmp_path / "hf"), read_all(tmp_path / "out"))
    if shard_bytes:
        weight_map = json.loads((tmp_path / "out" / INDEX_FILE).read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1
    # an equivalent config: re-importing the export gives the same LlamaConfig
    assert cream_jax.hf.read_config(tmp_path / "out") == cream_jax.hf.read_config(tmp_path / "hf")


EXPORT_ROPES = {
    "default": {"theta": 500000.0},
    "linear": {"type": "linear", "factor": 4.0},
    "ntk": {"type": "ntk", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.torch
@pytest.mark.parametrize("rope", sorted(EXPORT_ROPES))
def test_transformers_loads_the_export(tmp_path, torch_and_transformers, rope):
    """No custom code needed: AutoModelForCausalLM reproduces our logits from the export alone."""
    torch, transformers = torch_and_transformers
    cfg = cream_jax.preset("debug", rope=EXPORT_ROPES[rope], max_position_embeddings=256)
    ours = cream_jax.init(cfg, seed=3)
    cream_jax.save_hf(ours, tmp_path, progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.max_position_embeddings == 256
    tokens = np.random.default_rng(0).integers(0, 128, (1, 40))
    positions = np.arange(0, 400, 10)[None]  # past max_position_embeddings: dynamic's base grows
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens), position_ids=torch.from_numpy(positions)).logits.numpy()
    got = np.asarray(ours(tokens, position_ids=positions))
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


def test_ntk_exports_as_plain_theta():
    cfg = cream_jax.preset("debug", rope={"type": "ntk", "factor": 4.0})
    hf = config_to_hf(cfg)
    d = cfg.head_dim
    assert hf["rope_scaling"] is None
    assert hf["rope_theta"] == pytest.approx(10000.0 * 4.0 ** (d / (d - 2)))


def test_both_rope_spellings_load():
    legacy = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 8.0})
    v5 = {**legacy, "rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 8.0,
                                                              "rope_theta": 500000.0}}
    del v5["rope_theta"]
    assert config_from_hf(legacy) == config_from_hf(v5)
    assert config_from_hf(v5).rope.theta == 500000.0 and config_from_hf(v5).rope.factor == 8.0


@pytest.mark.torch
def test_tokenizer_export_loads_with_autotokenizer(tmp_path, torch_and_transformers, spm_model):
    _, transformers = torch_and_transformers
    ours = cream_jax.init(cream_jax.preset("debug"))
    cream_jax.save_hf(ours, tmp_path / "out", tokenizer=spm_model, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    text = "The grass is green. The sky is blue."
    assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


@pytest.fixture
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    words = "the grass is green sky blue sun yellow here we go there and back again pass key remember it".split()
    rng = np.random.default_rng(0)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12)).capitalize() + "." for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=128,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    return d / "sp.model"


# ----------------------------------------------------------------------------- bad inputs


def test_missing_config(tmp_path):
    with pytest.raises(HFFormatError, match="no config.json"):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
def test_missing_weights_file(tmp_path):
    random_hf_llama(tmp_path)
    (tmp_path / SINGLE_FILE).unlink()
    with pytest.raises(HFFormatError, match="neither model.safetensors nor"):
        cream_jax.load_hf(tmp_path)


def test_missing_shard(tmp_path):
    cream_jax.save_hf(cream_jax.init(cream_jax.preset("debug")), tmp_path, max_shard_bytes=20_000, progress=False)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(HFFormatError, match=victim.name):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
def test_missing_tensor_is_named(tmp_path):
    random_hf_llama(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / SINGLE_FILE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(HFFormatError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
def test_extra_tensor_is_named(tmp_path):
    random_hf_llama(tmp_path, tie_word_embeddings=True)
    tensors = safetensors.numpy.load_file(tmp_path / SINGLE_FILE)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    safetensors.numpy.save_file(tensors, tmp_path / SINGLE_FILE)
    with pytest.raises(HFFormatError, match="unexpected tensor.*lm_head.weight.*tie_word_embeddings"):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
def test_shape_mismatch_is_named(tmp_path):
    random_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"model.layers.0.mlp.down_proj.weight has shape \[64, 128\].*implies \[64, 96\]"
    with pytest.raises(HFFormatError, match=expected):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_unknown_rope_type_is_named(tmp_path, spelling):
    random_hf_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config[spelling] = {"rope_type": "longrope", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match="rope_type='longrope'"):
        cream_jax.load_hf(tmp_path)


@pytest.mark.torch
def test_bad_override_is_named(tmp_path):
    random_hf_llama(tmp_path)
    with pytest.raises(cream_jax.ConfigError, match="attention='flash'"):
        cream_jax.load_hf(tmp_path, attention="flash")
    with pytest.raises(cream_jax.ConfigError, match=r"Unknown LlamaConfig field\(s\) \[.num_layers.\]"):
        cream_jax.load_hf(tmp_path, num_layers=3)


@pytest.mark.torch
def test_bf16_checkpoint_round_trips_through_fp32_params(tmp_path, torch_and_transformers):
    torch, _ = torch_and_transformers
    hf = random_hf_llama(tmp_path / "hf")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf16")
    ours = cream_jax.load_hf(tmp_path / "hf16", progress=False)  # param_dtype float32 (master weights)
    assert ours.model.embed_tokens.weight.value.dtype == np.float32
    cream_jax.save_hf(ours, tmp_path / "out", dtype="bfloat16", progress=False)
    assert_bit_identical(read_all(tmp_path / "hf16"), read_all(tmp_path / "out"))
    shutil.rmtree(tmp_path / "out")
