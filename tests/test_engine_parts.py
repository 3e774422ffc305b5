"""The engine's parts by their properties: the block allocator under random add/step/abort sequences (a
hypothesis state machine), incremental detokenization of byte-level BPE, stop strings, the paged cache's blocks."""

import pytest
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dsv2.errors import RequestError
from dsv2.inference.engine import Engine, SamplingParams
from dsv2.inference.engine.blocks import BlockPool, NoFreeBlocks
from dsv2.inference.engine.detokenizer import Detokenizer
from dsv2.training.data.tokenizer import train_tokenizer

VOCAB = 48


def small_model():
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, q_lora_rank=8,
                      kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                      n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                      bos_token_id=0, eos_token_id=1)
    return random_model(cfg, 0)


_MODEL = small_model()
PREFIXES = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23]]


class EngineMachine(RuleBasedStateMachine):
    """Random requests (some sharing a prefix, some with n > 1, some sampled) join, run and are aborted on a cache
    of 10 blocks of 4 tokens (preemption, prefix hits and copy-on-write all happen); after every rule each block's
    reference count is the number of live sequences holding it, free blocks are those nobody holds, and when no
    request is left every block is free."""

    def __init__(self):
        super().__init__()
        self.engine = Engine(_MODEL, num_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=12)
        self.count = 0

    @rule(prefix=st.sampled_from([[], *PREFIXES]), tail=st.lists(st.integers(2, VOCAB - 1), min_size=1,
                                                                    max_size=7),
          n=st.integers(1, 3), max_tokens=st.integers(1, 6), greedy=st.booleans())
    def add(self, prefix, tail, n, max_tokens, greedy):
        self.count += 1
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=0 if greedy else 1.0, seed=self.count)
        try:
            self.engine.add_request(str(self.count), prefix + tail, params)
        except RequestError as e:  # its worst case (n copies of the prompt's partial block) is more than the cache
            assert "cache blocks" in str(e)

    @rule(times=st.integers(1, 4))
    def step(self, times):
        for _ in range(times):
            self.engine.step()

    @precondition(lambda self: self.engine.has_unfinished())
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.engine._requests)))
        assert self.engine.abort(rid)

    @invariant()
    def reference_counts(self):
        pool = self.engine.pool
        pool.check()
        held = [0] * pool.num_blocks
        for req in self.engine._requests.values():
            for s in req.seqs:
                for b in s.blocks:
                    held[b] += 1
        assert held == pool.refs
        if not self.engine.has_unfinished():
            assert pool.num_free == pool.num_blocks

    def teardown(self):
        while self.engine.has_unfinished():
            self.engine.step()
            self.reference_counts()
        assert self.engine.pool.num_free == self.engine.pool.num_blocks


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_pool_refuses_to_over_allocate_or_over_release():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    with pytest.raises(NoFreeBlocks):
        pool.allocate()
    pool.release([a])
    with pytest.raises(AssertionError):
        pool.release([a])
    pool.cache(b, b"h")
    pool.release([b])
    assert pool.lookup(b"h") == b and pool.refs[b] == 1 and pool.hits == 1  # taken back from the free list
    pool.release([b])
    assert pool.allocate() == a and pool.allocate() == b  # least recently freed first; b's hash evicted
    assert pool.lookup(b"h") is None
    pool.check()


# ---------------------------------------------------------------------------------------------------------------
# detokenization
TEXTS = ["naïve café résumé", "日本語のテキスト", "emoji 🙂🚀 done", "plain ascii words and more words",
         "ünïcödé ßtraße", "mixed 漢字 and ascii"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 20, vocab_size=300, min_frequency=2)


def _stream(tokenizer, ids, stop=()):
    d = Detokenizer(tokenizer, stop)
    deltas = [d.push(t) for t in ids]
    deltas.append(d.finish())
    return d, deltas


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_deltas_concatenate_to_the_full_decode(tokenizer, data):
    """Random token sequences (whole texts' tokens, or arbitrary ids that split multi-byte characters anywhere):
    the deltas add up to decode(all), and a stream whose full decode has no U+FFFD never shows one."""
    text = data.draw(st.sampled_from(TEXTS))
    ids = tokenizer.encode(text).ids
    if data.draw(st.booleans()):
        ids = data.draw(st.lists(st.integers(3, tokenizer.get_vocab_size() - 1), max_size=30))
    d, deltas = _stream(tokenizer, ids)
    full = tokenizer.decode(ids)
    assert "".join(deltas) == full == d.text
    if "\ufffd" not in full:
        assert all("\ufffd" not in x for x in deltas)


def test_split_character_is_emitted_whole(tokenizer):
    """🙂 is 4 bytes: fed one byte token at a time, nothing shows until the last one."""
    byte_ids = [tokenizer.token_to_id(c) for c in "ðŁĻĤ"]  # byte-level BPE's symbols for F0 9F 99 82
    assert tokenizer.decode(byte_ids) == "🙂"
    _, deltas = _stream(tokenizer, byte_ids)
    assert deltas == ["", "", "", "🙂", ""]


@settings(max_examples=200, deadline=None)
@given(text=st.sampled_from(TEXTS), data=st.data())
def test_stop_strings_are_cut_exactly(tokenizer, text, data):
    """A stop string taken from anywhere in the text (and one that never occurs): the stream ends right before
    its first occurrence, never shows any part of it, and holds back nothing else."""
    i = data.draw(st.integers(0, len(text) - 1))
    stop = text[i:i + data.draw(st.integers(1, 4))]
    d, deltas = _stream(tokenizer, tokenizer.encode(text).ids, [stop, "never-there"])
    assert "".join(deltas) == text[: text.find(stop)] == d.text
    assert d.stopped


def test_a_prefix_of_a_stop_string_is_held_back_then_released(tokenizer):
    d = Detokenizer(tokenizer, ["words!"])
    shown = "".join(d.push(t) for t in tokenizer.encode("more words").ids)
    assert shown == "more "  # "words" could begin the stop string
    assert d.finish() == "words" and not d.stopped


def test_engine_stop_strings_with_a_tokenizer(tokenizer):
    """A sampled completion, then the same seed with a stop string from its text: the text ends before it, the
    streamed deltas never contain it, and the finish reason is stop."""
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), num_hidden_layers=2, max_position_embeddings=96,
                      bos_token_id=0, eos_token_id=1)
    engine = Engine(random_model(cfg, 1), tokenizer, num_blocks=32, block_size=8)
    params = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)
    (full,) = engine.generate(["naïve"], SamplingParams(**params), progress=False)
    text = full.outputs[0].text
    assert text == tokenizer.decode(full.outputs[0].token_ids) and len(text) > 10
    stop = text[len(text) // 2:len(text) // 2 + 3]
    engine.add_request("s", "naïve", SamplingParams(**params, stop=[stop]))
    deltas, last = [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas.append(out.outputs[0].text_delta)
            last = out
    c = last.outputs[0]
    assert c.text == "".join(deltas) == text[: text.find(stop)]
    assert c.finish_reason == "stop" and all(stop not in x for x in deltas)


def test_text_prompts_get_bos(tokenizer):
    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), num_hidden_layers=2, bos_token_id=0, eos_token_id=1)
    engine = Engine(random_model(cfg, 1), tokenizer, num_blocks=32, block_size=8)
    (out,) = engine.generate(["café"], SamplingParams(max_tokens=1), progress=False)
    assert out.prompt_token_ids == [0, *tokenizer.encode("café").ids]


def test_from_pretrained_with_its_tokenizer(tokenizer, tmp_path):
    import dsv2
    from dsv2.training.data.tokenizer import save_tokenizer

    cfg = tiny_config(vocab_size=tokenizer.get_vocab_size(), num_hidden_layers=2, bos_token_id=0, eos_token_id=1)
    dsv2.save_pretrained(random_model(cfg, 2), tmp_path)
    save_tokenizer(tokenizer, tmp_path)
    engine = Engine.from_pretrained(tmp_path, num_blocks=16, block_size=8)
    (out,) = engine.generate(["naïve"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                             progress=False)
    assert out.outputs[0].text == tokenizer.decode(out.outputs[0].token_ids)
    assert len(out.outputs[0].token_ids) == 5
