"""lm-evaluation-harness both ways on a dsv2 checkpoint: against `dsv2 serve` with its `local-completions` model
(echo + logprobs requests, zero errors) and in-process (`dsv2 eval --tasks`: dsv2.eval.LMEvalModel on the engine),
on a multiple-choice task and a perplexity task shipped as local files (tests/data/lm_eval); the two give the same
numbers (1e-4 relative), and LMEvalModel's per-item log-likelihoods are transformers' DeepseekV2ForCausalLM's on the
same checkpoint (fp32, 1e-4 per token)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_serve import Server, _checkpoint

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models

DATA = Path(__file__).parent / "data" / "lm_eval"
TASKS = {"dsv2_mc": ("multiple_choice", "mc.jsonl", 'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                     'doc_to_target: "{{answer}}"\ntarget_delimiter: " "\nmetric_list:\n  - metric: acc\n'),
         "dsv2_ppl": ("loglikelihood_rolling", "ppl.jsonl", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      "metric_list:\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")}
OFFLINE = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dsv2.tokenizer import TOKENIZER_CONFIG_FILE, load_tokenizer, tokenizer_config

    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = _checkpoint(root / "tiny", chat=False)
    cfg = tokenizer_config(load_tokenizer(ckpt), 256)  # what dsv2's checkpoints carry
    (ckpt / TOKENIZER_CONFIG_FILE).write_text(json.dumps(cfg))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, (kind, data, rest) in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA / data}\n"
            f"test_split: test\noutput_type: {kind}\n{rest}")
    return ckpt, tasks, root


def _metrics(results: dict) -> dict:
    return {(t, m.split(",")[0]): v for t, r in results.items() for m, v in r.items()
            if isinstance(v, float) and "stderr" not in m}


def test_server_and_in_process_agree(setup):
    ckpt, tasks, root = setup
    server = Server(ckpt)
    try:
        args = (f"base_url={server.url}/v1/completions,model=tiny,tokenizer={ckpt},tokenizer_backend=huggingface,"
                "num_concurrent=1,max_retries=1,max_length=257")
        p = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                            "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--output_path",
                            str(root / "out")], capture_output=True, text=True, timeout=600, env=OFFLINE)
    finally:
        server.stop()
    assert p.returncode == 0, p.stderr[-3000:]
    (results_file,) = (root / "out").rglob("results*.json")
    via_server = _metrics(json.loads(results_file.read_text())["results"])
    q = subprocess.run([sys.executable, "-m", "dsv2", "eval", "--model", str(ckpt), "--tasks", ",".join(TASKS),
                        "--include-path", str(tasks), "--seq-len", "256", "--json", "--quiet"], capture_output=True,
                       text=True, timeout=600, env=OFFLINE)
    assert q.returncode == 0, q.stderr[-3000:]
    in_process = _metrics(json.loads(q.stdout.strip().splitlines()[-1])["results"])
    assert via_server.keys() == in_process.keys() and {k[1] for k in via_server} >= {"acc", "bits_per_byte"}
    for k, v in via_server.items():
        assert abs(v - in_process[k]) <= 1e-4 * max(1.0, abs(v)), (k, v, in_process[k])


def test_per_item_loglikelihoods_are_the_models(setup):
    from lm_eval.api.instance import Instance

    import dsv2
    from dsv2.eval import LMEvalModel

    ckpt, _, _ = setup
    engine = dsv2.Engine.from_pretrained(ckpt)
    lm = LMEvalModel(engine, progress=False)
    pairs = [("naïve", " café"), ("plain ascii", " words and more"), ("", "emoji 🙂")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                           disable_tqdm=True)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()  # the reference
    for (ctx, cont), (value, greedy) in zip(pairs, got, strict=True):
        c_ids, k_ids = lm._encode_pair(ctx, cont) if ctx else ([lm.prefix_token_id], lm.tok_encode(cont))
        ids = c_ids + k_ids
        with torch.inference_mode():
            lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        rows = range(len(c_ids) - 1, len(ids) - 1)
        want = sum(lp[r, ids[r + 1]].item() for r in rows)
        assert abs(value - want) <= 1e-4 * len(k_ids)
        assert greedy == all(int(lp[r].argmax()) == ids[r + 1] for r in rows)
    # a text longer than the context: rolling windows that each fit it (with the one token a request samples)
    (long,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("plain ascii words " * 200,), 0)],
                                       disable_tqdm=True)
    assert long < 0 and long == long
