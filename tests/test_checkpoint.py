"""save_pretrained / from_pretrained: round trips, sharding, tying, dtypes, precise errors, transformers loading
dsv2's checkpoints, and no unpickling.

Round trips are compared exactly (same fp32 bits); transformers vs dsv2 logits atol 1e-4 (fp32, as
test_parity_hf.py).
"""

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, from_pretrained, save_pretrained
from dsv2.cpu import optimize
from dsv2.model import DeepseekV2

SRC = Path(dsv2.__file__).resolve().parent
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def make_config(q_lora_rank=24, yarn=True, tie=False, topk_method="group_limited_greedy", first_dense=1):
    n_group = 4 if topk_method == "group_limited_greedy" else 1
    return tiny_config(
        vocab_size=128, hidden_size=48, intermediate_size=80, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=3, num_key_value_heads=3, q_lora_rank=q_lora_rank, kv_lora_rank=24,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=first_dense, n_group=n_group,
        topk_group=2 if n_group > 1 else 1, topk_method=topk_method, routed_scaling_factor=1.5,
        max_position_embeddings=128, rope_scaling=dict(YARN) if yarn else None, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=1)


def make_model(seed=0, **kw):
    """A random model with the CPU fast paths on, as from_pretrained returns them: round trips compare bits."""
    torch.manual_seed(seed)
    model = DeepseekV2(make_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norms away from 1 so a dropped norm weight shows
    return optimize(model)


IDS = torch.randint(2, 128, (2, 17), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved fp32 checkpoint, copied by tests that corrupt it."""
    path = tmp_path_factory.mktemp("ckpt")
    model = make_model()
    save_pretrained(model, path)
    return path, model


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------------------------
def test_round_trip_identical_logits(saved):
    path, model = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", SINGLE_FILE]
    loaded = from_pretrained(path)
    assert not loaded.training
    assert loaded.config.to_dict() == {**model.config.to_dict(), "torch_dtype": "float32"}
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_saved_file_uses_official_names_and_layout(saved):
    path, model = saved
    tensors = load_file(path / SINGLE_FILE)
    Fi, D = model.config.moe_intermediate_size, model.config.hidden_size
    experts = model.model.layers[1].mlp.experts
    for j in range(8):
        torch.testing.assert_close(tensors[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"],
                                   experts.gate_up_proj[j, :Fi], atol=0, rtol=0)
        torch.testing.assert_close(tensors[f"model.layers.1.mlp.experts.{j}.up_proj.weight"],
                                   experts.gate_up_proj[j, Fi:], atol=0, rtol=0)
        assert tensors[f"model.layers.1.mlp.experts.{j}.down_proj.weight"].shape == (D, Fi)
    assert not any("gate_up_proj" in k for k in tensors)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_experts.down_proj.weight",
              "model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
              "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.2.self_attn.kv_b_proj.weight"):
        assert k in tensors, k
    with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"] and cfg["model_type"] == "deepseek_v2"
    assert cfg["rope_scaling"]["type"] == "yarn" and cfg["torch_dtype"] == "float32"


def test_sharded_save_writes_index_and_loads(tmp_path, saved):
    _, model = saved
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / SINGLE_FILE).exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    stored = {}
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), s.name))
            # no shard above the limit unless it holds a single tensor
            assert s.stat().st_size <= 64 * 1024 + 8192 or len(list(f.keys())) == 1
    assert index["weight_map"] == stored
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    torch.testing.assert_close(logits(from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)
    # saving again unsharded into the same directory leaves no stale shards behind
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", SINGLE_FILE]
    torch.testing.assert_close(logits(from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


def test_tied_embeddings(tmp_path):
    model = make_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / SINGLE_FILE)
    loaded = from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    # a tied checkpoint that also stores lm_head.weight (as some tools write) loads too
    t = load_file(tmp_path / SINGLE_FILE)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, tmp_path / SINGLE_FILE)
    torch.testing.assert_close(logits(from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


def test_dtype_argument_and_stored_dtype(tmp_path, saved):
    path, model = saved
    bf = from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())
    torch.testing.assert_close(bf.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16(), atol=0,
                               rtol=0)
    assert (logits(bf).float() - logits(model)).abs().max() < 0.1
    # a bf16 checkpoint loads as bf16 by default, and as fp32 when asked
    save_pretrained(bf, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / SINGLE_FILE).values())
    again = from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in again.parameters())
    torch.testing.assert_close(logits(again), logits(bf), atol=0, rtol=0)
    assert from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_stacked_expert_form_loads(tmp_path, saved):
    path, model = saved
    copy_ckpt(path, tmp_path)
    t = load_file(tmp_path / SINGLE_FILE)
    for i in (1, 2):
        pre = f"model.layers.{i}.mlp.experts"
        for j in range(8):
            for part in ("gate_proj", "up_proj", "down_proj"):
                del t[f"{pre}.{j}.{part}.weight"]
        t[f"{pre}.gate_up_proj"] = model.model.layers[i].mlp.experts.gate_up_proj.detach().clone()
        t[f"{pre}.down_proj"] = model.model.layers[i].mlp.experts.down_proj.detach().clone()
    save_file(t, tmp_path / SINGLE_FILE)
    torch.testing.assert_close(logits(from_pretrained(tmp_path)), logits(model), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# errors
def _rewrite(path: Path, edit):
    t = load_file(path / SINGLE_FILE)
    edit(t)
    save_file(t, path / SINGLE_FILE)


def test_missing_tensor_is_named(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.2\.mlp\.experts\.5\.up_proj"):
        from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.rotary_emb"):
        from_pretrained(path)


def test_wrong_shape_is_named(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(60, 20)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.self_attn\.kv_b_proj\.weight'.*shape \(60, 20\)"
                                              r".*expects \(60, 24\)"):
        from_pretrained(path)


def test_truncated_file(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    data = (path / SINGLE_FILE).read_bytes()
    (path / SINGLE_FILE).write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        from_pretrained(path)


@pytest.mark.parametrize("how", ["header_json", "header_length", "empty"])
def test_corrupt_header(tmp_path, saved, how):
    path = copy_ckpt(saved[0], tmp_path)
    data = bytearray((path / SINGLE_FILE).read_bytes())
    if how == "header_json":
        data[8:20] = b"!!not json!!"
    elif how == "header_length":
        data[:8] = struct.pack("<Q", 2**40)
    else:
        data = b""
    (path / SINGLE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(path)


def test_invalid_config(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["topk_group"] = 9
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"invalid config: .*topk_group must be in \[1, n_group=4\]"):
        from_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config file"):
        from_pretrained(path)


def test_directory_without_weights(tmp_path, saved):
    (tmp_path / "config.json").write_bytes((saved[0] / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"holds neither model\.safetensors nor model\.safetensors\.index"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        from_pretrained(tmp_path / "nope")


def test_index_naming_missing_shard(tmp_path, saved):
    _, model = saved
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=re.escape(victim.name)):
        from_pretrained(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{broken")
    with pytest.raises(CheckpointError, match="not a valid index"):
        from_pretrained(tmp_path)


def _sharded(tmp_path: Path, saved) -> tuple[Path, dict]:
    save_pretrained(saved[1], tmp_path, max_shard_bytes=64 * 1024)
    return tmp_path, json.loads((tmp_path / INDEX_FILE).read_text())


def test_tensor_stored_in_two_shards(tmp_path, saved):
    path, _ = _sharded(tmp_path, saved)
    first, second = sorted(path.glob("model-*.safetensors"))[:2]
    t = load_file(second)
    name = sorted(load_file(first))[0]
    t[name] = torch.zeros_like(load_file(first)[name])  # a second, different copy of a tensor of shard 1
    save_file(t, second)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' is stored twice, in {first.name} and "
                                              rf"{second.name}"):
        from_pretrained(path)


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/model.safetensors", "a/../../x.safetensors"])
def test_index_entry_outside_the_folder(tmp_path, saved, shard):
    path, index = _sharded(tmp_path / "ckpt", saved)
    (tmp_path / "other").mkdir()
    copy = sorted(path.glob("model-*.safetensors"))[0]
    (tmp_path / "other" / "model.safetensors").write_bytes(copy.read_bytes())
    index["weight_map"][next(iter(index["weight_map"]))] = shard
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"names shard {re.escape(repr(shard))}, which is outside"):
        from_pretrained(path)


@pytest.mark.parametrize("weight_map", [["model-00001-of-00002.safetensors"], "x", {"a": 3}])
def test_index_weight_map_not_an_object_of_names(tmp_path, saved, weight_map):
    path, index = _sharded(tmp_path, saved)
    (path / INDEX_FILE).write_text(json.dumps({**index, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"weight_map must be an object"):
        from_pretrained(path)
    (path / INDEX_FILE).write_text("[]")
    with pytest.raises(CheckpointError, match=r"not a valid index"):
        from_pretrained(path)


def test_integer_tensor_where_a_weight_belongs(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite(path, lambda t: t.update({name: torch.ones(60, 24, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' in model.safetensors is I32; a model weight "
                                              r"must be floating-point"):
        from_pretrained(path)


def test_non_finite_values_are_named_unless_allowed(tmp_path, saved):
    path = copy_ckpt(saved[0], tmp_path)
    name = "model.layers.2.mlp.experts.3.down_proj.weight"

    def poison(t):
        t[name][0, 0] = float("nan")
    _rewrite(path, poison)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(name)}' in model.safetensors holds NaN or infinite"):
        from_pretrained(path)
    model = from_pretrained(path, allow_non_finite=True)
    assert torch.isnan(model.model.layers[2].mlp.experts.down_proj[3, 0, 0])


def test_checkpoint_files_get_the_usual_permissions(tmp_path, saved):
    import os

    old = os.umask(0o022)
    try:
        from dsv2.files import file_mode

        file_mode.cache_clear()
        save_pretrained(saved[1], tmp_path / "one")
        save_pretrained(saved[1], tmp_path / "sharded", max_shard_bytes=64 * 1024)
    finally:
        os.umask(old)
        file_mode.cache_clear()
    files = list((tmp_path / "one").iterdir()) + list((tmp_path / "sharded").iterdir())
    assert any(f.suffix == ".safetensors" for f in files)
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}  # as open() makes them: 0666 - umask


# ---------------------------------------------------------------------------------------------------------------
# transformers reads what dsv2 writes (the reverse direction of test_parity_hf.py)
@pytest.mark.parametrize("q_lora_rank,yarn,topk_method,first_dense", [
    (24, True, "group_limited_greedy", 1), (None, False, "greedy", 0), (None, True, "group_limited_greedy", 1)])
def test_transformers_loads_dsv2_checkpoint(tmp_path, q_lora_rank, yarn, topk_method, first_dense):
    transformers = pytest.importorskip("transformers")
    model = make_model(seed=7, q_lora_rank=q_lora_rank, yarn=yarn, topk_method=topk_method, first_dense=first_dense)
    save_pretrained(model, tmp_path)
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_sd = ref.state_dict()
    assert hf_sd["model.layers.1.mlp.gate.weight"].shape == (8, 48)
    with torch.no_grad():
        want = ref(IDS).logits
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
def test_no_unpickling_in_source():
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for pat in (r"torch\.load\(", r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"\.bin\b"):
            if re.search(pat, text, re.M) and not (pat == r"\.bin\b" and f.parent.name != "checkpoint"):
                offenders.append(f"{f.name}: {pat}")
    assert not offenders, offenders


def test_loading_never_unpickles(tmp_path, saved, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    # a stray pytorch_model.bin next to the safetensors is ignored, never opened
    path = copy_ckpt(saved[0], tmp_path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    torch.testing.assert_close(logits(from_pretrained(path)), logits(saved[1]), atol=0, rtol=0)
    (path / SINGLE_FILE).unlink()
    with pytest.raises(CheckpointError, match="holds neither"):
        from_pretrained(path)


def test_a_sharded_runs_reader_returns_the_rows_it_asks_for_alone(saved, tmp_path):
    """checkpoint/reader.py, what a rank of an --fsdp --init-from run reads: rows lo .. hi-1 of a plain weight (its
    bytes alone) and of stacked experts (those experts' tensors alone) equal the whole parameter's rows."""
    from dsv2.checkpoint.reader import WeightReader

    path, model = saved
    reader = WeightReader(path)
    params = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.experts.down_proj", "model.norm.weight"):
        p = params[name].detach()
        n = p.shape[0]
        for rows in ((0, n), (1, n // 2 + 1), (n - 1, n), (3, 3)):
            assert torch.equal(reader.full(name, p.shape, rows), p[rows[0]:rows[1]]), (name, rows)
        assert torch.equal(reader.full(name, p.shape), p)
    with pytest.raises(CheckpointError, match="the config expects"):
        reader.full("model.embed_tokens.weight", torch.Size([7, 3]), (0, 2))
    emb = params["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match="outside its"):
        reader.full("model.embed_tokens.weight", emb.shape, (3, emb.shape[0] + 1))
    with pytest.raises(CheckpointError, match="has no tensor"):
        reader.full("model.layers.0.no_such.weight", torch.Size([4]), (0, 2))
