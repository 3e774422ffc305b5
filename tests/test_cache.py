"""The preallocated KV cache: sizes per token (PAPER.md Table 1), capacity errors, bookkeeping."""

import pytest
import torch
from conftest import tiny_config

from dsv2.model import DeepseekV2
from dsv2.model.cache import CacheFullError, KVCache
from dsv2.presets import get_config

DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2}


def meta_model(cfg):
    with torch.device("meta"):
        return DeepseekV2(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "small", "deepseek-v2", "deepseek-v2-lite"])
def test_mla_bytes_per_token(name, dtype):
    cfg = get_config(name)
    cache = meta_model(cfg).new_cache(2, 8, dtype=dtype)
    want = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * DTYPE_BYTES[dtype]
    assert cache.bytes_per_token() == want
    assert cache.nbytes() == want * 2 * 8
    assert set(cache.buffers) == {"c_kv", "k_pe"}


def test_paper_element_counts():
    # PAPER.md: 576 x 60 = 34,560 elements per token for V2, 576 x 27 = 15,552 for Lite (bf16: 2 bytes each)
    assert meta_model(get_config("deepseek-v2")).new_cache(1, 4, dtype=torch.bfloat16).bytes_per_token() == 34560 * 2
    lite = meta_model(get_config("deepseek-v2-lite")).new_cache(1, 4, dtype=torch.bfloat16)
    assert lite.bytes_per_token() == 15552 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kv_heads", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_baseline_bytes_per_token(kind, kv_heads, dtype):
    cfg = tiny_config(attention_type=kind, num_key_value_heads=2)
    d_h, layers = cfg.qk_nope_head_dim, cfg.num_hidden_layers
    assert cfg.v_head_dim == d_h and cfg.num_attention_heads == 4
    cache = meta_model(cfg).new_cache(1, 4, dtype=dtype)
    # Table 1: MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l elements
    assert cache.bytes_per_token() == 2 * kv_heads * d_h * layers * DTYPE_BYTES[dtype]
    mla = meta_model(tiny_config()).new_cache(1, 4, dtype=dtype)
    assert mla.bytes_per_token() == (64 + 16) * layers * DTYPE_BYTES[dtype]


def test_default_cache_dtype_follows_model():
    model = DeepseekV2(tiny_config()).bfloat16()
    cache = model.new_cache(1, 4)
    assert all(b.dtype == torch.bfloat16 for b in cache.buffers.values())
    assert cache.bytes_per_token() == 80 * 4 * 2


def test_cache_full_error_via_model():
    torch.manual_seed(0)
    model = DeepseekV2(tiny_config()).eval()
    cache = model.new_cache(2, 6)
    ids = torch.randint(0, 100, (2, 4))
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :2], cache=cache)  # exactly full: allowed
        assert cache.length == 6
        with pytest.raises(CacheFullError, match="holds 6 tokens; 6 used, 1 more"):
            model(ids[:, :1], cache=cache)
    assert cache.length == 6  # unchanged by the failed call


def test_cache_full_error_on_begin():
    cache = KVCache({"c_kv": 4, "k_pe": 2}, num_layers=2, batch_size=1, max_len=5, dtype=torch.float32)
    cache.begin(3)
    cache.advance(3)
    with pytest.raises(CacheFullError):
        cache.begin(3)
    cache.begin(2)  # the failed reservation left no trace
    cache.advance(2)
    assert cache.length == 5


def test_new_cache_beyond_context_errors():
    model = meta_model(tiny_config())
    assert model.config.max_position_embeddings == 2048
    model.new_cache(1, 2048)
    with pytest.raises(ValueError, match="cache length 2049 exceeds max_position_embeddings 2048"):
        model.new_cache(1, 2049)


def test_update_returns_filled_prefix_and_valid_marks_padding():
    cache = KVCache({"a": 3, "b": 2}, num_layers=2, batch_size=2, max_len=6, dtype=torch.float32)
    cache.begin(2, torch.tensor([[False, True], [True, True]]))
    a1, b1 = torch.ones(2, 2, 3), torch.full((2, 2, 2), 2.0)
    out_a, out_b = cache.update(1, a=a1, b=b1)
    assert out_a.shape == (2, 2, 3) and out_b.shape == (2, 2, 2)
    cache.update(0, a=a1 * 5, b=b1 * 5)
    cache.advance(2)
    cache.begin(1)
    out_a, out_b = cache.update(1, a=torch.full((2, 1, 3), 7.0), b=torch.full((2, 1, 2), 8.0))
    cache.advance(1)
    assert out_a.shape == (2, 3, 3)
    torch.testing.assert_close(out_a[:, :2], a1)
    torch.testing.assert_close(out_a[:, 2], torch.full((2, 3), 7.0))
    torch.testing.assert_close(cache.buffers["a"][0, :, :2], a1 * 5)  # layers are separate
    assert cache.valid[:, :3].tolist() == [[False, True, True], [True, True, True]]
    assert not cache.valid[:, 3:].any()
    assert cache.batch_size == 2
