"""ModelConfig: the official configs, the presets, the config.json round trip and every validation rule."""

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv2.config import NULL_MEANS, ConfigError, ModelConfig
from dsv2.presets import PRESETS, get_config

REF_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"
OFFICIAL = {"deepseek-v2": "deepseek-v2.config.json", "deepseek-v2-lite": "deepseek-v2-lite.config.json"}
FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "extra"]


def official_json(name: str) -> dict:
    path = REF_DIR / OFFICIAL[name]
    if not path.exists():
        pytest.skip(f"reference config {path} not present")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------------------------
# official configs and presets
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_config_equals_preset_field_by_field(name):
    raw = official_json(name)
    loaded = ModelConfig.from_json(REF_DIR / OFFICIAL[name])
    preset = get_config(name)
    for f in FIELDS:
        assert getattr(loaded, f) == getattr(preset, f), f
    # every official key is either a field with the same value or kept in extra, never dropped
    for k, v in raw.items():
        if k in FIELDS:
            assert getattr(loaded, k) == v, k
        else:
            assert loaded.extra[k] == v, k


def test_official_sizes_match_paper():
    v2, lite = get_config("deepseek-v2"), get_config("deepseek-v2-lite")
    # MLA cache elements per token: (d_c + d_h^R) * l  (PAPER.md: 34,560 and 15,552)
    assert (v2.kv_lora_rank + v2.qk_rope_head_dim) * v2.num_hidden_layers == 34560
    assert (lite.kv_lora_rank + lite.qk_rope_head_dim) * lite.num_hidden_layers == 15552
    assert v2.q_lora_rank == 1536 and lite.q_lora_rank is None
    assert (v2.n_group, v2.topk_group, v2.topk_method) == (8, 3, "group_limited_greedy")
    # 1/sqrt(192) * (0.1 * 0.707 * ln 40 + 1)^2
    assert v2.softmax_scale == pytest.approx(192**-0.5 * (0.1 * 0.707 * 3.6888794541139363 + 1) ** 2, rel=1e-12)


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_to_dict_from_dict(name):
    cfg = get_config(name)
    d = cfg.to_dict()
    json.dumps(d)  # JSON-serialisable
    again = ModelConfig.from_dict(d)
    for f in FIELDS:
        assert getattr(again, f) == getattr(cfg, f), f
    assert again.to_dict() == d


def test_save_and_from_json_round_trip(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, eos_token_id=[1, 2], extra={"foo": {"bar": [1, 2]}})
    cfg.save(tmp_path / "ckpt")
    again = ModelConfig.from_json(tmp_path / "ckpt")
    for f in FIELDS:
        assert getattr(again, f) == getattr(cfg, f), f
    # architectures/model_type are written for transformers and come back as extra keys
    assert again.extra == {"foo": {"bar": [1, 2]}, "architectures": ["DeepseekV2ForCausalLM"],
                           "model_type": "deepseek_v2"}


def test_rope_parameters_form_reads_like_original():
    for name in OFFICIAL:
        raw = official_json(name)
        tf = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
        tf["rope_parameters"] = {"rope_type": "yarn", "rope_theta": raw["rope_theta"],
                                 **{k: v for k, v in raw["rope_scaling"].items() if k != "type"}}
        a, b = ModelConfig.from_dict(raw), ModelConfig.from_dict(tf)
        for f in FIELDS:
            assert getattr(a, f) == getattr(b, f), f
        assert "rope_parameters" not in b.to_dict()  # the original form is written
        assert b.to_dict()["rope_scaling"]["type"] == "yarn"
    # plain RoPE in the new form
    d = tiny_config().to_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0


def test_transformers_written_config_reads_like_original(tmp_path):
    transformers = pytest.importorskip("transformers")
    raw = official_json("deepseek-v2")
    transformers.DeepseekV2Config(**raw).save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path)
    preset = get_config("deepseek-v2")
    for f in FIELDS:
        assert getattr(cfg, f) == getattr(preset, f), f


def test_rope_scaling_default_type_means_none():
    d = tiny_config().to_dict()
    d["rope_scaling"] = {"rope_type": "default"}
    assert ModelConfig.from_dict(d).rope_scaling is None
    del d["rope_scaling"]
    assert ModelConfig.from_dict(d).rope_scaling is None


def test_unknown_keys_kept_and_written_back():
    d = tiny_config().to_dict()
    d.update({"auto_map": {"AutoConfig": "x.Y"}, "use_cache": True, "my_flag": [1, 2, 3]})
    cfg = ModelConfig.from_dict(d)
    assert cfg.extra["auto_map"] == {"AutoConfig": "x.Y"} and cfg.extra["my_flag"] == [1, 2, 3]
    out = cfg.to_dict()
    for k in ("auto_map", "use_cache", "my_flag"):
        assert out[k] == d[k]
    assert "extra" not in out
    # from_dict must not alias the caller's dict
    d["my_flag"].append(4)
    assert cfg.extra["my_flag"] == [1, 2, 3]


def test_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("deepseek-v9")


# ---------------------------------------------------------------------------------------------------------------
# validation: each rule raises ConfigError naming the problem
@pytest.mark.parametrize("changes,pattern", [
    (dict(n_routed_experts=15), r"n_routed_experts \(15\) must be divisible by n_group \(4\)"),
    (dict(topk_group=5), r"topk_group must be in \[1, n_group=4\]"),
    (dict(topk_group=0), r"topk_group"),
    (dict(num_experts_per_tok=9, topk_group=2), r"num_experts_per_tok \(9\) exceeds the experts available in "
                                                r"topk_group=2 groups of 4 experts \(8\)"),
    (dict(num_experts_per_tok=17), r"num_experts_per_tok must be in \[1, n_routed_experts=16\]"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer"),
    (dict(vocab_size=-3), r"vocab_size must be a positive integer"),
    (dict(num_hidden_layers=0), r"num_hidden_layers"),
    (dict(num_attention_heads=0), r"num_attention_heads"),
    (dict(kv_lora_rank=0), r"kv_lora_rank"),
    (dict(v_head_dim=0), r"v_head_dim"),
    (dict(intermediate_size=0), r"intermediate_size"),
    (dict(moe_intermediate_size=0), r"moe_intermediate_size"),
    (dict(q_lora_rank=0), r"q_lora_rank must be null"),
    (dict(hidden_size=True), r"hidden_size must be an integer, got True"),
    (dict(topk_method="noaux_tc"), r"topk_method must be one of .*noaux_tc is DeepSeek-V3"),
    (dict(topk_method="bogus"), r"topk_method must be one of .*'bogus'"),
    (dict(scoring_func="sigmoid"), r"scoring_func must be 'softmax'.*'sigmoid'"),
    (dict(hidden_act="relu"), r"hidden_act must be one of .*'relu'"),
    (dict(qk_rope_head_dim=15), r"qk_rope_head_dim must be even"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"rope_scaling type must be 'yarn'.*'linear'"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0}), r"missing \['original_max_position_embeddings'\]"),
    (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
     r"factor must be >= 1"),
    (dict(attention_type="gqa", num_key_value_heads=3), r"gqa needs num_attention_heads \(4\) divisible by "
                                                        r"num_key_value_heads \(3\)"),
    (dict(attention_type="linear"), r"attention_type must be one of"),
    (dict(attention_bias=True), r"attention_bias"),
    (dict(eos_token_id=4096), r"eos_token_id=4096 is outside the vocabulary"),
    (dict(bos_token_id=-1), r"bos_token_id=-1 is outside the vocabulary"),
    (dict(moe_layer_freq=0), r"moe_layer_freq must be >= 1"),
    (dict(first_k_dense_replace=-1), r"first_k_dense_replace must be >= 0"),
    (dict(n_shared_experts=-1), r"n_shared_experts must be >= 0"),
    (dict(device_balance_alpha=-0.1), r"device_balance_alpha must be >= 0"),
])
def test_validation_rules(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        tiny_config(**changes)
    # the same through from_dict (the config.json path)
    d = tiny_config().to_dict()
    d.update(changes)
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.from_dict(d)


def test_validation_rule_boundaries_are_accepted():
    # exactly the experts available in topk_group groups, topk_group == n_group, greedy ignores groups
    tiny_config(num_experts_per_tok=8, topk_group=2)
    tiny_config(topk_group=4, num_experts_per_tok=16)
    tiny_config(topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=16)
    tiny_config(n_routed_experts=None, n_group=3)  # dense model: MoE rules do not apply
    tiny_config(attention_type="gqa", num_key_value_heads=2)
    tiny_config(q_lora_rank=None)
    cfg = tiny_config()
    with pytest.raises(ConfigError):
        cfg.replace(topk_group=7)  # replace() validates too


def test_from_json_wraps_errors_with_path(tmp_path):
    d = tiny_config().to_dict()
    d["qk_rope_head_dim"] = 7
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: qk_rope_head_dim must be even"):
        ModelConfig.from_json(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# configs as other tools write them: nulls, wrong types, files that are not JSON objects
def test_transformers_greedy_config_with_null_groups_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    # transformers' own defaults for everything but the sizes: greedy routing, n_group/topk_group null
    hf = transformers.DeepseekV2Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                       num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
                                       qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=6,
                                       num_experts_per_tok=2, bos_token_id=0, eos_token_id=1)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["n_group"] is None and raw["topk_group"] is None and raw["topk_method"] == "greedy"
    cfg = ModelConfig.from_json(tmp_path)
    assert (cfg.n_group, cfg.topk_group) == (NULL_MEANS["n_group"], NULL_MEANS["topk_group"]) == (1, 1)
    assert cfg.to_dict()["architectures"] == ["DeepseekV2ForCausalLM"]
    ModelConfig.from_dict(cfg.to_dict())  # and what dsv2 writes back loads again


def test_null_means_the_default():
    d = tiny_config().to_dict()
    d.update(num_experts_per_tok=None, rms_norm_eps=None, hidden_act=None, n_group=None, topk_group=None)
    cfg = ModelConfig.from_dict(d)
    assert cfg.num_experts_per_tok == 6 and cfg.rms_norm_eps == 1e-6 and cfg.hidden_act == "silu"
    assert cfg.n_group == cfg.topk_group == 1
    assert ModelConfig.from_dict({**d, "q_lora_rank": None}).q_lora_rank is None  # null is a value here


@pytest.mark.parametrize("field,value,pattern", [
    ("vocab_size", "4096", r"vocab_size must be an integer, got '4096' \(str\)"),
    ("hidden_size", [128], r"hidden_size must be an integer, got \[128\]"),
    ("n_group", 4.0, r"n_group must be an integer, got 4.0 \(float\)"),
    ("rms_norm_eps", "1e-6", r"rms_norm_eps must be a finite number"),
    ("norm_topk_prob", "false", r"norm_topk_prob must be true or false"),
    ("topk_method", 3, r"topk_method must be a string"),
    ("rope_scaling", [1, 2], r"rope_scaling must be an object or null"),
    ("rope_scaling", {"type": "yarn", "factor": "4", "original_max_position_embeddings": 64},
     r"rope_scaling.factor must be a finite number"),
    ("eos_token_id", "1", r"eos_token_id must be an integer or a list of integers or null"),
])
def test_wrong_types_name_the_file_and_field(tmp_path, field, value, pattern):
    d = tiny_config().to_dict()
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config\.json: " + pattern):
        ModelConfig.from_json(tmp_path)


def test_files_that_are_not_a_json_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json: a config must be a JSON object of fields, got list"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"config\.json is not a text file"):
        ModelConfig.from_json(tmp_path)


def test_unknown_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown model config field 'nosuchfield'"):
        tiny_config(nosuchfield=3)
    with pytest.raises(ConfigError, match=r"did you mean 'hidden_size'"):
        tiny_config().replace(hiden_size=3)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=6)
FIELD_NAMES = st.sampled_from(sorted(FIELDS + ["rope_parameters", "extra"]))


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(FIELD_NAMES, JSON, min_size=1, max_size=3), yarn=st.booleans())
def test_any_json_value_in_any_field_is_accepted_or_a_config_error(changes, yarn):
    base = tiny_config().to_dict()
    if yarn:
        base["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    d = {**base, **changes}
    try:
        cfg = ModelConfig.from_dict(d)
    except ConfigError:
        return
    # whatever was accepted is a config whose derived values and round trip work
    assert cfg.softmax_scale > 0 and cfg.qk_head_dim > 0
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------------------------------------------
# tiny preset
def test_tiny_preset_is_small_and_shaped_like_v2():
    from dsv2.model import DeepseekV2
    from dsv2.model.moe import MLP, MoE

    cfg = tiny_config()
    assert cfg.q_lora_rank is not None
    assert cfg.n_group > 1 and 1 <= cfg.topk_group < cfg.n_group and cfg.topk_method == "group_limited_greedy"
    assert cfg.n_shared_experts and cfg.n_shared_experts >= 1
    assert cfg.first_k_dense_replace == 1 and cfg.attention_type == "mla"
    assert cfg.num_experts_per_tok > 1
    model = DeepseekV2(cfg)
    assert 1_000_000 <= model.num_parameters() <= 10_000_000
    assert isinstance(model.model.layers[0].mlp, MLP)
    assert all(isinstance(layer.mlp, MoE) for layer in model.model.layers[1:])
