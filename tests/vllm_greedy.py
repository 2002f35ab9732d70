"""Greedy tokens from vLLM for exported models: run by tests/test_serving.py with the vLLM environment's
Python (vLLM pins its own torch and transformers, so it cannot share the tests' environment).

    python tests/vllm_greedy.py SPEC.json OUT.json

SPEC: {"max_tokens": N, "models": [{"path": DIR, "prompts": [[ids...], ...]}, ...]}. OUT: for each model, the
architecture vLLM resolved and the new token ids of each prompt. One process starts the models' engines
one after another (vLLM's start-up imports are paid once)."""

import gc
import json
import sys


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.load(open(spec_path))
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, detokenize=False)
    results = []
    for model in spec["models"]:
        llm = LLM(model=model["path"], skip_tokenizer_init=True, dtype="float32", enforce_eager=True, seed=0,
                  distributed_executor_backend="uni",  # with VLLM_ENABLE_V1_MULTIPROCESSING=0: all in this process
                  max_model_len=spec.get("max_model_len", 2048), max_num_seqs=len(model["prompts"]),
                  trust_remote_code=model.get("trust_remote_code", False))
        arch = llm.llm_engine.model_config.architectures
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in model["prompts"]], params, use_tqdm=False)
        results.append({"path": model["path"], "architectures": arch,
                        "tokens": [list(o.outputs[0].token_ids) for o in outs]})
        del llm
        gc.collect()
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
