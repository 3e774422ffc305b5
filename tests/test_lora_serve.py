"""Serving LoRA adapters: the engine's adapter slots (requests of several adapters and of the base model in one
batch, each as that adapter alone), its adapter-keyed prefix cache, and `dsv2 serve --lora-modules` with the
official openai client, /v1/models and the load/unload endpoints."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from test_lora import trained
from test_serve import Server, _checkpoint, _ids

import dsv2
from dsv2.errors import AdapterError, RequestError
from dsv2.inference.engine import Engine, SamplingParams
from dsv2.lora import load_adapter, save_adapter

ADAPTERS = {"a": ("attention", 1), "b": ("experts,shared", 2), "c": ("all-linear", 3)}
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A checkpoint with a tokenizer and a chat template, and three adapters of it (ranks 4, 4, 8)."""
    root = tmp_path_factory.mktemp("lora_serve")
    base = _checkpoint(root / "tiny", chat=True)
    out = {}
    for name, (targets, seed) in ADAPTERS.items():
        model = trained(dsv2.from_pretrained(base), targets, r=8 if name == "c" else 4, seed=seed, std=0.3)
        save_adapter(model, root / name, alpha=16.0, base=str(base))
        out[name] = root / name
    return base, out


def engine(base, adapter=None, **kw):
    """An engine over the base model, or over the base with one adapter applied (load_adapter: the reference)."""
    model = dsv2.from_pretrained(base)
    return Engine(model if adapter is None else load_adapter(model, adapter), num_blocks=64, block_size=8, **kw)


def run(e: Engine, jobs: list[tuple[list[int], str | None]]) -> list:
    """All the jobs queued at once, stepped together: each one's final completion."""
    for i, (ids, adapter) in enumerate(jobs):
        e.add_request(str(i), e.admit(ids, GREEDY, adapter=adapter))
    done = {}
    while e.has_unfinished():
        done.update({o.request_id: o.outputs[0] for o in e.step() if o.finished})
    return [done[str(i)] for i in range(len(jobs))]


def test_mixed_adapter_batches_equal_each_adapter_alone(folders, kernels):
    base, paths = folders
    tok = dsv2.tokenizer.load_tokenizer(base)
    prompts = [_ids(tok, t) for t in ("plain ascii words", "mixed 漢字 and", "emoji 🙂", "naïve café")]
    jobs = [(prompts[i % 4], [None, "a", "b", "c"][i % 4]) for i in range(8)]
    jobs += [(prompts[0], "b"), (prompts[0], None)]  # one prompt under two adapters: no shared cache blocks
    e = engine(base, max_loras=3, max_lora_rank=8)
    for name, path in paths.items():
        e.add_adapter(name, path)
    got = run(e, jobs)
    for (ids, adapter), out in zip(jobs, got, strict=True):
        (want,) = run(engine(base, paths.get(adapter)), [(ids, None)])
        assert out.token_ids == want.token_ids, adapter
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.logprobs, want.logprobs, strict=True)) < 1e-5
    assert len({tuple(o.token_ids) for o in got[:4]}) > 1  # the adapters change the output


def test_prefix_cache_is_keyed_by_adapter(folders):
    base, paths = folders
    e = engine(base, max_loras=2)
    e.add_adapter("a", paths["a"])
    ids = list(range(3, 30))
    run(e, [(ids, "a")])
    hits = e.stats["prefix_hits"]
    run(e, [(ids, None)])
    assert e.stats["prefix_hits"] == hits  # the base model's rows differ: no hit on the adapter's blocks
    run(e, [(ids, "a")])
    assert e.stats["prefix_hits"] > hits


def test_adapters_load_and_unload_between_steps(folders):
    base, paths = folders
    e = engine(base, max_loras=1, max_lora_rank=4)
    with pytest.raises(AdapterError, match="above --max-lora-rank 4"):
        e.add_adapter("c", paths["c"])
    e.add_adapter("a", paths["a"])
    with pytest.raises(AdapterError, match="slots are taken"):
        e.add_adapter("b", paths["b"])
    e.add_request("r", e.admit([3, 4, 5], GREEDY, adapter="a"))
    with pytest.raises(AdapterError, match="in use by 1"):
        e.remove_adapter("a")
    while e.has_unfinished():
        e.step()
    e.remove_adapter("a")
    with pytest.raises(RequestError, match="no LoRA adapter named 'a'"):
        e.admit([3, 4], GREEDY, adapter="a")
    e.add_adapter("b", paths["b"])  # into the freed slot, with nothing of a's left
    (out,) = run(e, [([3, 4, 5], "b")])
    assert out.token_ids == run(engine(base, paths["b"]), [([3, 4, 5], None)])[0].token_ids


@pytest.fixture(scope="module")
def server(folders):
    base, paths = folders
    s = Server(base, "--lora-modules", *(f"{n}={p}" for n, p in paths.items()), "--max-loras", "4",
               "--enable-lora-loading")
    yield s
    s.stop()


def test_server_serves_each_adapter_by_model_name(server, folders):
    base, paths = folders
    client = server.client()
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "a", "b", "c"} and cards["b"].parent == "tiny" and cards["b"].root == "b"
    prompt = "plain ascii words"

    def ask(model):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return r.model, r.choices[0].text

    with ThreadPoolExecutor(8) as pool:  # 8 concurrent requests over 3 adapters and the base model
        together = list(pool.map(ask, ["tiny", "a", "b", "c"] * 2))
    alone = [ask(m) for m in ["tiny", "a", "b", "c"]]
    assert together == alone * 2 and [m for m, _ in alone] == ["tiny", "a", "b", "c"]
    assert len({t for _, t in alone}) > 1
    chat = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert chat.model == "c"
    r = httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "'tiny', 'a', 'b', 'c'" in r.json()["error"]["message"]


def test_load_and_unload_endpoints(server, folders, tmp_path):
    _, paths = folders
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=30)  # noqa: E731
    r = post("/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": str(paths["a"])})
    assert r.status_code == 200 and "added" in r.text
    client = server.client()
    assert "a2" in {m.id for m in client.models.list().data}
    same = [client.completions.create(model=m, prompt="emoji", max_tokens=6, temperature=0).choices[0].text
            for m in ("a", "a2")]
    assert same[0] == same[1]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
    r = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(bad)})
    assert r.status_code == 400 and "pickled" in r.json()["error"]["message"]
    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(paths["b"])}).status_code == 400  # full
    assert post("/v1/unload_lora_adapter", {"lora_name": "a2"}).status_code == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "a2"}).status_code == 400
    assert "a2" not in {m.id for m in client.models.list().data}


def test_runtime_loading_needs_an_api_key_or_the_flag(folders):
    base, paths = folders
    s = Server(base, "--max-loras", "1")
    try:
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(paths["a"])})
        assert r.status_code == 403 and "--enable-lora-loading" in r.json()["error"]["message"]
    finally:
        s.stop()
    s = Server(base, "--max-loras", "1", "--api-key", "k")
    try:
        body = {"lora_name": "a", "lora_path": str(paths["a"])}
        assert httpx.post(s.url + "/v1/load_lora_adapter", json=body).status_code == 401
        ok = httpx.post(s.url + "/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_serve_refuses_a_bad_adapter_before_loading(folders, tmp_path):
    from conftest import run_dsv2

    base, _ = folders
    (tmp_path / "empty").mkdir()
    r = run_dsv2(["serve", "--model", str(base), "--lora-modules", f"x={tmp_path / 'empty'}"])
    assert r.returncode != 0 and "no adapter_model.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = run_dsv2(["serve", "--model", str(base), "--lora-modules", "x"])
    assert r.returncode != 0 and "NAME=DIR" in r.stderr


def test_engine_without_slots_says_so(folders):
    base, paths = folders
    with pytest.raises(AdapterError, match="max_loras"):
        engine(base).add_adapter("a", paths["a"])


def test_an_engine_adapter_equals_its_merged_checkpoint(folders, tmp_path):
    """fp32: the slot's tokens and log-probabilities are those of the base with the adapter folded in (1e-5)."""
    from dsv2.cli import main

    base, paths = folders
    assert main(["merge-lora", str(base), str(paths["c"]), str(tmp_path / "merged")]) == 0
    e = engine(base, max_loras=2, max_lora_rank=8)
    e.add_adapter("c", paths["c"])
    jobs = [([3, 4, 5, 6, 7, 8, 9, 10, 11], "c"), ([3, 4, 5], None), ([12, 13, 14, 15], "c")]
    got = run(e, jobs)
    want = run(Engine(dsv2.from_pretrained(tmp_path / "merged"), num_blocks=64, block_size=8),
               [(ids, None) for ids, a in jobs if a])
    for out, ref in zip([g for g, (_, a) in zip(got, jobs, strict=True) if a], want, strict=True):
        assert out.token_ids == ref.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.logprobs, ref.logprobs, strict=True)) < 1e-5
