"""`make demo`'s entry point runs end to end and its exports agree with transformers."""

import json

from cream_jax import demo


def test_demo_runs(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 3 and all(r["relative_logit_error"] < 1e-4 for r in rows)
    assert (tmp_path / "eabf_theta5e5" / "modeling_eabf_llama.py").exists()
    assert "EabfLlamaForCausalLM" in capsys.readouterr().out
