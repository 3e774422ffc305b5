"""dsv2 serve: real servers (subprocesses on free ports of 127.0.0.1) on a tiny fp32 checkpoint with a byte-level
BPE tokenizer and a chat template, driven with the official openai client and plain HTTP.

The reference is dsv2.generate's greedy tokens for the same prompt ids, decoded by the same tokenizer."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import random_model, tiny_config

openai = pytest.importorskip("openai")

TEXTS = ["naïve café résumé", "日本語のテキスト", "emoji 🙂🚀 done", "plain ascii words and more words",
         "ünïcödé ßtraße", "mixed 漢字 and ascii", "User: hello\n\nAssistant: hi there"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
            "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
            "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
CONTEXT = 256


def _checkpoint(path: Path, chat: bool) -> Path:
    import dsv2
    from dsv2.training.data.tokenizer import save_tokenizer, train_tokenizer

    tok = train_tokenizer(TEXTS * 20, vocab_size=300, min_frequency=2)
    cfg = tiny_config(vocab_size=tok.get_vocab_size(), num_hidden_layers=2, max_position_embeddings=CONTEXT,
                      bos_token_id=tok.token_to_id("<|bos|>"), eos_token_id=tok.token_to_id("<|eos|>"))
    dsv2.save_pretrained(random_model(cfg, 3), path)
    save_tokenizer(tok, path)
    if chat:
        (path / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|bos|>", "eos_token": {"content": "<|eos|>"}, "chat_template": TEMPLATE}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dsv2", "serve", "--model", str(model), "--port",
                                      str(self.port), "--served-model-name", "tiny", "--num-blocks", "64",
                                      "--block-size", "8", "--log-level", "warning", *args], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited:\n" + "".join(self.log))
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.log))

    def client(self, key: str = "none", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("serve") / "tiny", chat=True)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(ckpt):
    """(tokenizer, greedy(prompt_ids, n) -> text of dsv2.generate's n greedy tokens)."""
    import dsv2
    from dsv2.tokenizer import load_tokenizer

    model = dsv2.from_pretrained(ckpt).eval()
    tok = load_tokenizer(ckpt)

    def greedy(ids: list[int], n: int) -> str:
        with torch.inference_mode():
            (out,) = dsv2.generate(model, [ids], n, eos_token_id=[])
        return tok.decode(out)

    return tok, greedy


def _ids(tok, text: str) -> list[int]:
    return [tok.token_to_id("<|bos|>"), *tok.encode(text).ids]


def test_models_and_health(server):
    (model,) = server.client().models.list().data
    assert model.id == "tiny" and model.owned_by == "dsv2"
    assert httpx.get(server.url + "/health").status_code == 200


@pytest.mark.parametrize("prompt", ["naïve café", "日本語の", "emoji 🙂"])
def test_completion_is_generate_greedy(server, reference, prompt):
    tok, greedy = reference
    c = server.client()
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    ids = _ids(tok, prompt)
    assert r.choices[0].text == greedy(ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    # the same prompt as token ids; streamed deltas (multi-byte characters split across tokens) add up to it
    r_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert r_ids.choices[0].text == r.choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert "\ufffd" not in "".join(ch.choices[0].text for ch in chunks if ch.choices) or "\ufffd" in r.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_lists_n_echo_and_logprobs(server, reference):
    tok, greedy = reference
    c = server.client()
    r = c.completions.create(model="tiny", prompt=["naïve", "café"], max_tokens=4, temperature=0, n=2, echo=True,
                             extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == "naïve" + greedy(_ids(tok, "naïve"), 4)
    assert r.choices[2].text == "café" + greedy(_ids(tok, "café"), 4)
    assert r.usage.completion_tokens == 16
    lp = c.completions.create(model="tiny", prompt=[[0, 5, 6], [0, 7]], max_tokens=3, temperature=0, logprobs=2,
                              extra_body={"ignore_eos": True})
    for ch in lp.choices:
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) == 3
        assert all(v <= 0 for v in ch.logprobs.token_logprobs)
        assert all(1 <= len(top) <= 3 for top in ch.logprobs.top_logprobs)
        assert "".join(ch.logprobs.tokens) == ch.text or "\ufffd" in "".join(ch.logprobs.tokens)


def test_echo_logprobs_are_the_prompts(server, ckpt, reference):
    """echo + logprobs (lm-evaluation-harness's loglikelihood request): OpenAI's logprobs over prompt + completion,
    null for the first prompt token, the prompt's values the plain model's log-softmax (fp32, 1e-4 per token);
    max_tokens 0 returns the prompt alone; token-id and text prompts, lists of them, streamed; vLLM's
    prompt_logprobs field."""
    import dsv2

    tok, _ = reference
    model = dsv2.from_pretrained(ckpt).eval()
    c = server.client()

    def want(ids):
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
        return [lp[p - 1, ids[p]].item() for p in range(1, len(ids))]

    prompts = [_ids(tok, "naïve café"), [0, 5, 6, 9, 12]]
    for max_tokens in (0, 2):
        r = c.completions.create(model="tiny", prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True,
                                 logprobs=2, extra_body={"ignore_eos": True})
        for ch, ids in zip(r.choices, prompts, strict=True):
            lps = ch.logprobs
            assert len(lps.tokens) == len(ids) + max_tokens and lps.token_logprobs[0] is None
            assert lps.top_logprobs[0] is None and all(len(t) >= 2 for t in lps.top_logprobs[1:])
            got = lps.token_logprobs[1:len(ids)]
            assert max(abs(a - b) for a, b in zip(got, want(ids), strict=True)) <= 1e-4
            assert lps.text_offset == sorted(lps.text_offset)
        assert r.usage.completion_tokens == 2 * max_tokens
    text = c.completions.create(model="tiny", prompt="naïve café", max_tokens=0, echo=True, logprobs=0)
    assert text.choices[0].text == "naïve café" and text.choices[0].finish_reason == "length"
    alone = text.choices[0].logprobs.token_logprobs[1:]  # the text prompt is prompts[0]; alone in its step
    assert max(abs(a - b) for a, b in zip(alone, want(prompts[0]), strict=True)) <= 1e-4
    chunks = list(c.completions.create(model="tiny", prompt=prompts[1], max_tokens=2, temperature=0, echo=True,
                                       logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for ch in chunks if ch.choices and ch.choices[0].logprobs
                for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and len(streamed) == len(prompts[1]) + 2
    assert max(abs(a - b) for a, b in zip(streamed[1:len(prompts[1])], want(prompts[1]), strict=True)) <= 1e-4
    v = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompts[1], "max_tokens": 1,
                                                          "prompt_logprobs": 1}).json()
    plp = v["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompts[1])
    assert abs(plp[1][str(prompts[1][1])]["logprob"] - want(prompts[1])[0]) <= 1e-4
    assert server.metric("dsv2_prompt_logprobs_uncached_total") >= 5  # each echo + logprobs prompt above
    bad = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"


def test_chat(server, reference):
    from dsv2.chat_template import ChatTemplate

    tok, greedy = reference
    c = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "naïve café?"}]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = ChatTemplate(TEMPLATE, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}).render(messages)
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<|bos|>")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy(ids, 10)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    assert httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"] == ids
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == len(ids) + 10
    lp = c.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                   top_logprobs=2, extra_body={"ignore_eos": True})
    content = lp.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)


def test_chat_template_renders_as_transformers(ckpt):
    transformers = pytest.importorskip("transformers")
    from dsv2.chat_template import ChatTemplate

    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), bos_token="<|bos|>",
                                              eos_token="<|eos|>", chat_template=TEMPLATE)
    ours = ChatTemplate.from_checkpoint(ckpt)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "日本"},
                {"role": "user", "content": "and?"}]
    for gen in (True, False):
        assert ours.render(messages, gen) == hf.apply_chat_template(messages, tokenize=False,
                                                                   add_generation_prompt=gen)


def test_tokenize_detokenize(server, reference):
    tok, _ = reference
    r = httpx.post(server.url + "/tokenize", json={"prompt": "naïve café"}).json()
    assert r["tokens"] == _ids(tok, "naïve café") and r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    d = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert d["prompt"] == "naïve café"


def test_concurrent_streams_equal_alone(server):
    c = server.client()
    prompts = [f"{w} {i}" for i, w in enumerate(["naïve", "café", "日本", "emoji 🙂"] * 4)]

    def run(p: str, stream: bool) -> str:
        kw = dict(model="tiny", prompt=p, max_tokens=10, temperature=0.8, seed=7, extra_body={"ignore_eos": True})
        if not stream:
            return c.completions.create(**kw).choices[0].text
        return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))

    alone = [run(p, False) for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: run(p, True), prompts))
    assert together == alone


BAD = [  # (path, body or raw bytes, status, words in the message)
    ("/v1/completions", b"{not json", 400, "JSON"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n must"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [0, 99999]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * CONTEXT}, 400, "context"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT}, 400, "context"),
    ("/v1/completions", {"model": "other", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5,
                              "max_completion_tokens": 5}, 400, "max_tokens"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/nothing", {}, 404, "Not Found"),
    ("/detokenize", {"tokens": [-1]}, 400, "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * (5 << 20)}, 413, "over"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "min_tokens": 1, "stop_token_ids": [10**12]}, 400,
     "stop_token_ids"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a \\ud800"}', 400, "Unicode"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "Unicode"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a"] * 300}, 400, "queues"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and words in err["message"], err
    ok = server.client().completions.create(model="tiny", prompt="hi", max_tokens=2)  # still serving
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_chunked_oversized_body_is_a_413(server):
    def body():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(5):
            yield b"x" * (1 << 20)
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]


def test_nulls_are_defaults_and_min_tokens_alone(server):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
        "stream": None, "logprobs": None, "presence_penalty": None, "stop": None, "seed": None}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text
    chat = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                   extra_body={"min_tokens": 5}, stop=["<|eos|>"], seed=1)
    assert chat.usage.completion_tokens >= 5


def test_each_completion_finishes_once_in_a_stream(server):
    for kind in ("completions", "chat"):
        c = server.client()
        kw = dict(model="tiny", n=2, max_tokens=6, temperature=1.0, seed=3, stream=True)
        if kind == "chat":
            chunks = c.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kw)
        else:
            chunks = c.completions.create(prompt="naïve", **kw)
        finishes = [(ch.choices[0].index, ch.choices[0].finish_reason) for ch in chunks
                    if ch.choices and ch.choices[0].finish_reason]
        assert sorted(i for i, _ in finishes) == [0, 1], (kind, finishes)


def test_openai_client_raises_on_bad_input(server):
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="tiny", prompt="hi", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_disconnect_aborts_and_frees_blocks(server):
    body = {"model": "tiny", "prompt": "naïve", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert server.metric("dsv2_requests_running") == 1
    deadline = time.monotonic() + 20
    while server.metric("dsv2_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("dsv2_requests_running") == 0
    assert server.metric("dsv2_kv_cache_usage_ratio") == 0
    assert server.metric('dsv2_request_success_total{finished_reason="abort"}') >= 1


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("dsv2_requests_running", "dsv2_requests_waiting", "dsv2_kv_cache_usage_ratio",
                 "dsv2_prefix_cache_queries_total", "dsv2_prefix_cache_hits_total", "dsv2_prompt_tokens_total",
                 "dsv2_generation_tokens_total", "dsv2_time_to_first_token_seconds_bucket",
                 "dsv2_time_per_output_token_seconds_bucket", "dsv2_e2e_request_latency_seconds_count"):
        assert name in text, name
    before_hits = server.metric("dsv2_prefix_cache_hits_total")
    c = server.client()
    for _ in range(2):  # the second time, the prompt's full blocks come from the prefix cache
        c.completions.create(model="tiny", prompt="plain ascii words and more words " * 2, max_tokens=2)
    assert server.metric("dsv2_prefix_cache_hits_total") > before_hits
    assert server.metric("dsv2_generation_tokens_total") >= 4


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with an API key, one sequence at a time, a queue of one, on a checkpoint without a chat template."""
    s = Server(_checkpoint(tmp_path_factory.mktemp("serve2") / "plain", chat=False), "--api-key", "sekrit",
               "--max-num-seqs", "1", "--max-queue", "1")
    yield s
    s.stop()


def test_api_key(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    r = httpx.post(guarded.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # OpenAI's code: a string
    assert r.headers["www-authenticate"].startswith("Bearer")  # RFC 9110: a 401 names its scheme
    assert httpx.get(guarded.url + "/health").status_code == 200  # probes need no key
    assert guarded.client("sekrit").completions.create(model="tiny", prompt="hi", max_tokens=2).usage
    for scheme in ("bearer", "BEARER", "Bearer"):  # the scheme is case-insensitive; the key is not
        ok = httpx.get(guarded.url + "/v1/models", headers={"Authorization": f"{scheme} sekrit"})
        assert ok.status_code == 200, (scheme, ok.text)
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer SEKRIT"}).status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Basic sekrit"}).status_code == 401


def test_no_chat_template_is_a_400(guarded):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        guarded.client("sekrit").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])


def test_full_queue_is_a_503_with_retry_after(guarded):
    c = guarded.client("sekrit")
    long = dict(model="tiny", prompt="naïve", max_tokens=240, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.completions.create, **long)
        deadline = time.monotonic() + 20
        while guarded.metric("dsv2_requests_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        waiting = pool.submit(c.completions.create, **long)
        while guarded.metric("dsv2_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = httpx.post(guarded.url + "/v1/completions", json={"model": "tiny", "prompt": "hi"},
                       headers={"Authorization": "Bearer sekrit"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "queue is full" in r.json()["error"]["message"]
        streamed = httpx.post(guarded.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": True},
                              headers={"Authorization": "Bearer sekrit"})
        assert streamed.status_code == 503 and "queue is full" in streamed.json()["error"]["message"]
        assert running.result().usage.completion_tokens == 240
        assert waiting.result().usage.completion_tokens == 240


def test_sigterm_drains_in_flight_requests(ckpt):
    s = Server(ckpt, "--grace", "60")
    try:
        body = {"model": "tiny", "prompt": "naïve", "max_tokens": 120, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            s.proc.send_signal(signal.SIGTERM)
            rest = [first, *lines]
        events = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
        assert rest[-1] == "data: [DONE]" or "data: [DONE]" in rest
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=2)
    finally:
        s.stop()


def test_serve_errors_are_one_line(ckpt, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsv2", "serve", *args], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))

    missing = run("--model", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "error" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = run("--model", str(ckpt), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot listen" in busy.stderr and busy.stderr.count("\n") == 1
    bad_len = run("--model", str(ckpt), "--max-model-len", "100000", "--port", str(_free_port()))
    assert bad_len.returncode == 2 and "--max-model-len" in bad_len.stderr


def test_openapi_lists_the_response_schemas(server, guarded):
    schema = httpx.get(server.url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    for name in ("CompletionRequest", "CompletionResponse", "CompletionStreamResponse", "ChatCompletionRequest",
                 "ChatCompletionResponse", "ChatCompletionChunk", "ModelList", "TokenizeResponse", "DetokenizeResponse",
                 "ErrorResponse", "Usage", "Delta"):
        assert name in components, name
    paths = schema["paths"]
    for path, method, model in (("/v1/models", "get", "ModelList"), ("/tokenize", "post", "TokenizeResponse"),
                                ("/detokenize", "post", "DetokenizeResponse"),
                                ("/v1/completions", "post", "CompletionResponse"),
                                ("/v1/chat/completions", "post", "ChatCompletionResponse")):
        responses = paths[path][method]["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + model), path
        assert responses["4XX"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), path
        assert "422" not in responses, path  # a bad body is a 400 in OpenAI's shape, not FastAPI's 422
    for path, events in (("/v1/completions", "CompletionStreamResponse"), ("/v1/chat/completions",
                                                                           "ChatCompletionChunk")):
        stream = paths[path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        assert stream["schema"]["$ref"].endswith("/" + events)
    assert "usage" not in components["ChatCompletionChunk"]["required"]
    # open without the API key, as /health (the key guards /v1/, /tokenize and /detokenize)
    assert httpx.get(guarded.url + "/openapi.json").status_code == 200
    assert httpx.get(guarded.url + "/docs").status_code == 200
    assert httpx.get(guarded.url + "/v1/models").status_code == 401


def test_each_request_is_admitted_once(ckpt):
    """The handler admits each prompt once (Engine.admit); the engine loop adds that Admission, unchecked."""
    from fastapi.testclient import TestClient

    from dsv2.chat_template import ChatTemplate
    from dsv2.inference.engine import Engine
    from dsv2.inference.engine.params import Admission
    from dsv2.serve.app import ServerConfig, build_app

    engine = Engine.from_pretrained(ckpt, num_blocks=64, block_size=8)
    admitted, added = [], []
    admit, add = engine.admit, engine.add_request
    engine.admit = lambda prompt, *a, **kw: admitted.append(prompt) or admit(prompt, *a, **kw)
    engine.add_request = lambda rid, adm, params=None: added.append((adm, params)) or add(rid, adm, params)
    app = build_app(engine, ServerConfig("tiny", engine.max_model_len), ChatTemplate.from_checkpoint(ckpt))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": ["naïve", "café"], "max_tokens": 2, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
        r = client.post("/v1/completions", json={"prompt": [0, 5, 6], "max_tokens": 2, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": CONTEXT})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    assert len(admitted) == 5 and admitted[2] == [0, 5, 6]
    assert len(added) == 4 and all(isinstance(adm, Admission) and params is None for adm, params in added)


def test_serve_uses_only_the_engines_public_api():
    import dsv2.serve

    for f in Path(dsv2.serve.__file__).parent.glob("*.py"):
        used = re.findall(r"engine\.(cache|pool|scheduler|_\w+)\b", f.read_text())
        assert not used, (f.name, used)
