"""dsv2 serve against a hostile but legitimate client: one request must not slow or stall the others, no answer
may be silently wrong, and the API and HTTP behave as OpenAI's do. Real servers on 127.0.0.1 (test_serve.Server),
driven with the openai client, httpx and raw sockets; the item numbers are the issue's."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest
from test_serve import CONTEXT, Server, _checkpoint

openai = pytest.importorskip("openai")
USER = [{"role": "user", "content": "naïve café?"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("limits") / "tiny", chat=True)


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--num-blocks", "256", "--max-queue", "8", "--max-num-seqs", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ids_only(tmp_path_factory):
    """A checkpoint without tokenizer.json (nor a chat template): token ids in, token ids out."""
    path = _checkpoint(tmp_path_factory.mktemp("ids") / "ids", chat=False)
    (path / "tokenizer.json").unlink()
    s = Server(path)
    yield s
    s.stop()


class HealthProbe:
    """GET /health every 20 ms on a thread of its own while the block runs; .worst is the slowest answer (s)."""

    def __init__(self, url: str):
        self.url, self.times, self._stop = url, [], threading.Event()

    def __enter__(self):
        def run():
            with httpx.Client(timeout=30) as c:
                while not self._stop.is_set():
                    t = time.perf_counter()
                    ok = c.get(self.url + "/health").status_code == 200
                    self.times.append(time.perf_counter() - t if ok else float("inf"))
                    time.sleep(0.02)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)

    @property
    def worst(self) -> float:
        return max(self.times)


def post(server: Server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


# -- 1-3: one request must not stall the others ---------------------------------------------------------------------
def test_1_thousands_of_stop_strings_are_refused_at_once(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 300, "stop": ["x" * 1000] * 3500}  # 3.5 MB, < 4 MiB
    with HealthProbe(server.url) as probe:
        t = time.perf_counter()
        r = post(server, "/v1/completions", body)
        took = time.perf_counter() - t
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
    assert "at most 4" in r.json()["error"]["message"] and took < 5, took
    assert probe.worst < 1.0, probe.worst
    long = post(server, "/v1/completions", {"prompt": "hi", "stop": ["x" * 257]})
    assert long.status_code == 400 and "256" in long.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 4, "stop": ["é" * 256] * 4})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize"])
def test_2_a_4mb_prompt_never_freezes_the_event_loop(server, path):
    text = "naïve café 日本語 " * 170_000  # 3.9 MB of UTF-8
    body = {"messages": [{"role": "user", "content": text}]} if path == "/v1/chat/completions" else {"prompt": text}
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert 3.5e6 < len(raw) < 4 << 20

    def send(_):
        return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=120)

    with HealthProbe(server.url) as probe:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(send, range(3)))
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert probe.worst < 1.0, probe.worst


def test_2_tokenizing_and_responses_run_off_the_event_loop(ckpt, monkeypatch):
    """In process: the tokenizer, the chat template and the JSON of a whole response run where no event loop does
    (a worker thread); and a long text is tokenized without holding the GIL."""
    import asyncio

    from fastapi.testclient import TestClient

    from dsv2.chat_template import ChatTemplate
    from dsv2.inference.engine import Engine
    from dsv2.serve.app import Server as ApiServer
    from dsv2.serve.app import ServerConfig

    engine = Engine.from_pretrained(ckpt, num_blocks=64, block_size=8)
    api = ApiServer(engine, ServerConfig("tiny", engine.max_model_len), ChatTemplate.from_checkpoint(ckpt))
    on_loop = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            try:
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:
                pass
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(engine, "encode", spy("encode", engine.encode))
    monkeypatch.setattr(api.chat_template, "render", spy("render", api.chat_template.render))
    monkeypatch.setattr(api.outputs, "completion_response", spy("response", api.outputs.completion_response))
    monkeypatch.setattr(api.outputs, "chat_response", spy("chat", api.outputs.chat_response))
    with TestClient(api.app) as client:
        assert client.post("/v1/completions", json={"prompt": "naïve", "max_tokens": 2}).status_code == 200
        assert client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
        assert client.post("/tokenize", json={"prompt": "naïve"}).status_code == 200
    assert on_loop == []

    gaps, done = [], threading.Event()

    def ticker():
        while not done.is_set():
            t = time.perf_counter()
            time.sleep(0.01)
            gaps.append(time.perf_counter() - t)

    thread = threading.Thread(target=ticker)
    thread.start()
    t = time.perf_counter()
    ids = Engine.encode(engine, "naïve café 日本語 " * 60_000)  # ~1.3 MB: about a second of tokenizing
    took = time.perf_counter() - t
    done.set()
    thread.join()
    assert len(ids) > 100_000 and max(gaps) < max(0.5, took / 2), (max(gaps), took)


def test_3_huge_logprob_responses_are_refused_or_bounded(server, ckpt, monkeypatch):
    with HealthProbe(server.url) as probe:
        big = post(server, "/v1/completions", {"prompt": "hi", "n": 128, "logprobs": 20, "max_tokens": 500})
        chat = post(server, "/v1/chat/completions", {"messages": USER, "n": 8, "logprobs": True,  # --max-queue 8
                                                      "top_logprobs": 20, "max_tokens": 7000})
    assert big.status_code == 400 and big.json()["error"]["param"] == "logprobs", big.text
    assert "[0, 5]" in big.json()["error"]["message"]
    assert chat.status_code == 400 and "log-probabilities" in chat.json()["error"]["message"], chat.text
    assert probe.worst < 1.0, probe.worst
    assert post(server, "/v1/completions", {"prompt": "hi", "n": 129}).json()["error"]["param"] == "n"
    assert post(server, "/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}
                ).json()["error"]["param"] == "top_logprobs"

    from fastapi.testclient import TestClient

    from dsv2.chat_template import ChatTemplate
    from dsv2.inference.engine import Engine
    from dsv2.serve import protocol
    from dsv2.serve.app import ServerConfig, build_app

    monkeypatch.setitem(protocol.LIMITS, "logprob_entries", 60)
    engine = Engine.from_pretrained(ckpt, num_blocks=64, block_size=8)
    with TestClient(build_app(engine, ServerConfig("tiny", engine.max_model_len),
                              ChatTemplate.from_checkpoint(ckpt))) as client:
        r = client.post("/v1/chat/completions", json={"messages": USER, "logprobs": True, "top_logprobs": 4,
                                                      "ignore_eos": True})  # no max_tokens: bounded to 60 / 5
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text
        r = client.post("/v1/chat/completions", json={"messages": USER, "logprobs": True, "top_logprobs": 4,
                                                      "max_tokens": 13})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text


# -- 4: slow clients are dropped ------------------------------------------------------------------------------------
def _held_for(port: int, first: bytes, drip: bytes = b"", limit: float = 30.0) -> tuple[float, bytes]:
    """Seconds until the server closes a connection that sends `first`, then `drip` a byte a second; and what it
    answered."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(1.0)
        start, got, i = time.monotonic(), b"", 0
        if first:
            s.sendall(first)
        while time.monotonic() - start < limit:
            try:
                data = s.recv(4096)
                if not data:
                    break
                got += data
            except TimeoutError:
                if drip:
                    try:
                        s.sendall(drip[i % len(drip):i % len(drip) + 1])
                    except OSError:
                        break
                    i += 1
            except OSError:
                break
        return time.monotonic() - start, got


def test_4_slow_headers_and_short_bodies_are_closed(server):
    from dsv2.serve.timeouts import Timeouts

    t = Timeouts()
    clients = [(b"POST /v1/completions HTTP/1.1\r\n", b"Host: 127.0.0.1\r\nX-Slow: yes\r\n")] * 20  # slowloris
    clients += [(b"", b"")]  # a connection that sends nothing
    clients += [(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ", b"")]  # a body shorter than its length
    with HealthProbe(server.url) as probe, ThreadPoolExecutor(len(clients)) as pool:
        held = list(pool.map(lambda c: _held_for(server.port, *c), clients))
    for (first, _), (seconds, answer) in zip(clients, held, strict=True):
        limit = t.body_idle if first.endswith(b": ") else t.header
        assert seconds < limit + 3, (first[:40], seconds)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert probe.worst < 1.0, probe.worst


# -- 5-8: no silent wrong answers -----------------------------------------------------------------------------------
def test_5_an_ids_only_checkpoint_returns_token_ids(ids_only):
    c = ids_only.client()
    kw = dict(model="tiny", prompt=[0, 5, 6], max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    r = c.completions.create(**kw)
    choice = r.choices[0].model_dump()
    assert choice["text"] is None and len(choice["token_ids"]) == 30 == r.usage.completion_tokens
    assert choice["prompt_token_ids"] == [0, 5, 6]
    chunks = [ch.choices[0].model_dump() for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert [t for ch in chunks for t in ch["token_ids"]] == choice["token_ids"]
    assert len(chunks) == 30 and all(ch["text"] is None for ch in chunks)
    lp = c.completions.create(logprobs=2, **kw).choices[0].model_dump()
    assert lp["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert lp["logprobs"]["text_offset"] is None
    for body, param in (({"stop": ["x"]}, "stop"), ({"echo": True}, None)):
        r = post(ids_only, "/v1/completions", {"prompt": [0, 5, 6], **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(ids_only, "/v1/completions", {"prompt": "text"}).status_code == 400
    assert post(ids_only, "/detokenize", {"tokens": [5]}).status_code == 400


def test_5_return_token_ids_with_a_tokenizer(server, ckpt):
    from dsv2.tokenizer import load_tokenizer

    kw = dict(model="tiny", prompt="naïve", max_tokens=8, temperature=0, extra_body={"ignore_eos": True,
                                                                                   "return_token_ids": True})
    choice = server.client().completions.create(**kw).choices[0].model_dump()
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "naïve"}).json()["tokens"]
    assert choice["prompt_token_ids"] == ids and len(choice["token_ids"]) == 8
    assert load_tokenizer(ckpt).decode(choice["token_ids"]) == choice["text"]  # special tokens skipped
    chat = server.client().chat.completions.create(model="tiny", messages=USER, max_tokens=4, stream=True,
                                                   extra_body={"return_token_ids": True, "ignore_eos": True})
    events = [ch.model_dump() for ch in chat]
    assert events[0]["prompt_token_ids"] and sum(len(e["choices"][0].get("token_ids") or [])
                                                 for e in events if e["choices"]) == 4


def test_6_chat_logprob_bytes_are_the_tokens_own(server, ckpt):
    from dsv2.tokenizer import load_tokenizer

    partial = load_tokenizer(ckpt).token_to_id("æ")  # byte-level BPE's token for the lone byte 0xE6
    r = server.client().chat.completions.create(
        model="tiny", messages=USER, max_tokens=4, temperature=0, logprobs=True, top_logprobs=5,
        logit_bias={str(partial): 100}, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert [e.bytes for e in content] == [[0xE6]] * 4 and all(e.token == "\ufffd" for e in content)
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    tops = [t for e in content for t in e.top_logprobs]
    assert all(t.bytes != [239, 191, 189] for t in tops if t.token == "\ufffd")


def test_7_seeded_choices_never_share_a_stream(server):
    c = server.client()
    kw = dict(model="tiny", prompt="naïve", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    seven = [ch.text for ch in c.completions.create(seed=7, n=3, **kw).choices]
    eight = c.completions.create(seed=8, **kw).choices[0].text
    assert eight not in seven[1:] and len(set(seven)) == 3
    assert c.completions.create(seed=7, **kw).choices[0].text == seven[0]  # choice 0 is the seed's own stream
    assert [ch.text for ch in c.completions.create(seed=7, n=3, **kw).choices] == seven


def test_8_requests_that_can_start_are_not_counted_as_waiting(server):
    """--max-queue 8 --max-num-seqs 4: of a burst of 20, 4 start at once and 8 wait; the rest get a 503."""
    body = {"model": "tiny", "prompt": "naïve", "max_tokens": CONTEXT - 16, "ignore_eos": True, "stream": True}
    go = threading.Barrier(20)
    with ExitStack() as stack, httpx.Client(timeout=60, limits=httpx.Limits(max_connections=40)) as client:
        def send(_):
            go.wait()
            r = stack.enter_context(client.stream("POST", server.url + "/v1/completions", json=body))
            return r.status_code

        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(send, range(20)))
    assert statuses.count(200) >= 12 and statuses.count(503) >= 1, statuses
    deadline = time.monotonic() + 30
    while server.metric("dsv2_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)  # the streams closed: their requests aborted


# -- 11-14: OpenAI's words, ranges and HTTP -------------------------------------------------------------------------
ERRORS = [  # (body or raw bytes, content type, message words, param)
    ({"prompt": 5}, None, "prompt must be a string, a list of strings", "prompt"),
    ({"prompt": "hi", "temperature": "5"}, None, "temperature must be a number", "temperature"),
    ({"prompt": [1, "a"]}, None, "prompt must be", "prompt"),
    ({"prompt": "hi", "min_tokens": 1, "stop_token_ids": [10**6]}, None, "vocabulary", "stop_token_ids"),
    ({"prompt": "hi", "logit_bias": {"AI": 1}}, None, "token ids", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, None, "vocabulary", "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, None, "[-100, 100]", "logit_bias"),
    ({"prompt": "hi", "temperature": 2.5}, None, "[0, 2]", "temperature"),
    ({"prompt": "hi", "temperature": 1e308}, None, "[0, 2]", "temperature"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, None, "at most 4", "stop"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, None, "stream: true", "stream_options"),
    ({"prompt": "hi", "best_of": 3}, None, "best_of", "best_of"),
    ({"prompt": "hi", "suffix": "x"}, None, "suffix", "suffix"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, None, "not supported", "response_format"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, None, "role must be one of", "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     None, "only text parts are supported", "messages.0.content.0"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, "tool", "tools"),
    ({"messages": USER, "functions": [{"name": "f"}]}, None, "function", "functions"),
    (b'{"prompt": "caf\xe9"}', "application/json", "not valid UTF-8", None),
    (b"[" * 10_000 + b"]" * 10_000, "application/json", "nested too deeply", None),
]


@pytest.mark.parametrize("body,kind,words,param", ERRORS, ids=[f"{i}-{e[2][:20]}" for i, e in enumerate(ERRORS)])
def test_11_12_errors_name_the_field_in_openais_words(server, body, kind, words, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kw = {"content": body, "headers": {"content-type": kind}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param, err
    assert err["code"] is None or isinstance(err["code"], str)
    for internal in ("function-after", "Input should", "list[", ".float", "body."):
        assert internal not in err["message"] and internal not in (err["param"] or ""), err


def test_12_harmless_values_logit_bias_and_json_as_text(server, ckpt):
    from dsv2.tokenizer import load_tokenizer

    for extra in ({"response_format": {"type": "text"}}, {"best_of": 1}, {"suffix": ""}, {"tools": []}):
        r = post(server, "/v1/completions" if "tools" not in extra else "/v1/chat/completions",
                 {"prompt": "hi", "messages": USER, "max_tokens": 2, **extra})
        assert r.status_code == 200, (extra, r.text)
    t = load_tokenizer(ckpt).token_to_id("a")
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 5, "logit_bias": {str(t): 100},
                                         "ignore_eos": True})
    assert r.json()["choices"][0]["text"] == "aaaaa", r.text
    greedy = post(server, "/v1/completions", {"prompt": [0, 5], "max_tokens": 1, "temperature": 0,
                                              "return_token_ids": True}).json()["choices"][0]["token_ids"][0]
    banned = post(server, "/v1/completions", {"prompt": [0, 5], "max_tokens": 1, "temperature": 0,
                                              "return_token_ids": True, "logit_bias": {str(greedy): -100}})
    assert banned.json()["choices"][0]["token_ids"][0] != greedy
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):  # valid JSON, whatever it is called
        r = httpx.post(server.url + "/v1/completions", content=json.dumps({"prompt": "hi", "max_tokens": 2}),
                       headers={"content-type": kind} if kind else {})
        assert r.status_code == 200, (kind, r.text)


def test_13_http_allow_head_and_codes(server):
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] is None
    assert set(httpx.post(server.url + "/health").headers["allow"].split(", ")) == {"GET", "HEAD"}
    for path in ("/health", "/v1/models", "/metrics"):
        head = httpx.head(server.url + path)
        assert head.status_code == 200 and head.content == b"", path
    missing = post(server, "/v1/completions", {"model": "other", "prompt": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    long = post(server, "/v1/completions", {"prompt": [1] * CONTEXT})
    assert long.json()["error"]["code"] == "context_length_exceeded"


def test_14_no_paths_and_no_redirects_from_host(server, ckpt):
    models = httpx.get(server.url + "/v1/models")
    assert models.json()["data"][0]["root"] == ckpt.name and str(ckpt.parent) not in models.text
    r = httpx.post(server.url + "/v1/completions/", json={"prompt": "hi"}, headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers, r.headers
    assert "evil.example" not in r.text
