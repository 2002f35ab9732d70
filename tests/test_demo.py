"""`make demo` end to end with a few steps of everything: data, pretraining, three fine-tunes, the passkey
evaluation, the HF export answered by transformers, and the results folder."""

import dataclasses
import json

import matplotlib.image
import pytest

from cream_jax import demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_results_folder(quick_demo):
    res = json.loads((quick_demo / "results.json").read_text())
    r = demo.Recipe.quick()
    lengths = [r.window * k for k in range(1, r.factor + 1)]
    assert res["lengths"] == lengths
    assert list(res["results"]) == ["unextended", f"{r.rope}, no fine-tune", "plain", "pose", "cream"]
    for name, model in res["results"].items():
        assert sorted(int(n) for n in model["accuracy_by_length"]) == lengths
        assert len(model["summary"]) == len(lengths) * len(demo.DEPTHS)
        assert model["rope"] == ("default" if name == "unextended" else r.rope)
    pretrain = res["results"]["unextended"]["run"]
    # 6 steps do not learn the task, so one more cosine cycle ran, and the extensions start from it
    assert pretrain["steps"] == r.pretrain_steps + r.anneal_steps and pretrain["run"].endswith("pretrain_anneal")
    assert 0.0 <= pretrain["passkey_within_window"] < r.pretrain_target
    pretrain_config = json.loads((quick_demo / "runs" / "pretrain" / "config.json").read_text())
    assert pretrain_config["train"]["weight_decay"] == r.pretrain_weight_decay > 0
    for method in demo.METHODS:  # each fine-tune ran its own position method from the pretrained model
        run = json.loads((quick_demo / "runs" / method / "config.json").read_text())
        assert run["positions"]["method"] == method
        assert run["model"]["init_from"].endswith("pretrain_anneal_hf")
        assert run["train"]["window"] == r.window and run["train"]["target_length"] == r.target
        assert run["train"]["weight_decay"] == 0.0
    readme = (quick_demo / "README.md").read_text()
    assert "| cream |" in readme and "passkey.png" in readme
    assert matplotlib.image.imread(quick_demo / "passkey.png").shape[0] > 100


@pytest.mark.torch
def test_hf_export_answered_by_transformers(quick_demo):
    export = json.loads((quick_demo / "results.json").read_text())["export"]
    assert export["model_class"] == "LlamaForCausalLM"
    assert demo.Recipe.quick().target - 40 < export["prompt_tokens"] <= demo.Recipe.quick().target
    assert export["prompt_ids_equal"]  # transformers' tokenizer on the prompt's text gives our ids
    # transformers from the export and cream-jax from the checkpoint answer the same prompt alike (greedy, fp32)
    assert export["answer"] == export["cream_jax_answer"] != ""
    hf_config = json.loads((quick_demo / "hf" / "config.json").read_text())
    assert hf_config["rope_scaling"]["rope_type"] == demo.Recipe.quick().rope
    assert (quick_demo / "hf" / "tokenizer.model").exists()


def test_rerun_reuses_the_runs_and_refuses_another_recipe(quick_demo, capsys):
    assert demo.main(["--quick", "--out", str(quick_demo), "--finetune_steps", "5"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert json.loads((quick_demo / "recipe.json").read_text())["finetune_steps"] == demo.Recipe.quick().finetune_steps


def test_a_folder_from_before_a_recipe_field_existed_is_the_same_recipe_at_its_default():
    before_novels = {k: v for k, v in dataclasses.asdict(demo.Recipe()).items() if k != "novels"}
    assert not demo.another_recipe(before_novels, demo.Recipe())  # it read all six novels, as the default does
    assert demo.another_recipe(before_novels, demo.Recipe(novels=1))
    assert demo.another_recipe({**before_novels, "novels": 6, "window": 64}, demo.Recipe())


def test_novels_beyond_the_corpus_is_a_clear_error(tmp_path, capsys):
    assert demo.main(["--quick", "--novels", "7", "--out", str(tmp_path)]) == 2
    assert "novels=7: the corpus holds 6; use 1 to 6" in capsys.readouterr().err
    assert not (tmp_path / "recipe.json").exists()  # the folder is not claimed by a recipe that cannot run
