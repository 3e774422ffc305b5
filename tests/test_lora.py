"""LoRA (dsv2/lora/): adapters on attention, the dense MLP, the shared and the routed experts; merging; slots; PEFT's
adapter folders, with PEFT and transformers (test-only) as the references; the engine's adapter batches.

Tolerances: fp32, 1e-5 between dsv2's own paths (adapter vs merged weights: a different summation order), 1e-4
against transformers + PEFT (another implementation of every op), as test_parity_hf.py.
"""

import copy
import json

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv2
from dsv2.errors import AdapterError, ConfigError
from dsv2.lora import (
    adapted,
    adapter_of,
    add_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    parse_targets,
    read_adapter,
    save_adapter,
    targeted,
)
from dsv2.lora.layers import Rows, groups_of

CFG = dict(num_hidden_layers=3, first_k_dense_replace=1)


def model_and_ids(seed=0, **kw):
    model = random_model(tiny_config(**{**CFG, **kw}), seed, std=0.05)
    return model, torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def trained(model, targets="all-linear", r=4, seed=1, std=0.05):
    """The model with adapters whose B is not zero (as after training)."""
    add_lora(model, targets, r=r, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, std, generator=g)
    return model


@pytest.mark.parametrize("q_lora_rank", [None, 32])
def test_fresh_adapters_leave_the_model_as_it_was(q_lora_rank):
    model, ids = model_and_ids(q_lora_rank=q_lora_rank)
    with torch.no_grad():
        want = model(ids)
    add_lora(model, "all-linear", r=4)
    assert {type(m).__name__ for _, m in adapted(model)} == {"LoRALinear", "LoRAExperts"}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in lora_parameters(model))
    with torch.no_grad():
        assert torch.equal(model(ids), want)  # B = 0: exactly the base model


@pytest.mark.parametrize("targets", ["attention", "experts", "shared,dense", "kv_b_proj", "all-linear"])
def test_an_adapted_model_equals_its_merged_weights(targets, kernels):
    """Through the naive path (a plain forward), the absorbed one (cached decode: kv_b's rank-r correction) and
    generate (CPU kernels for the base, the fused step stepping aside)."""
    model, ids = model_and_ids(q_lora_rank=32)
    model = trained(dsv2.cpu.optimize(model), targets)
    plain = merge_lora(copy.deepcopy(model))
    assert not list(adapted(plain))
    with torch.no_grad():
        want = plain(ids)
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=0)
        cache = model.new_cache(2, 12)
        model(ids[:, :9], cache=cache)
        torch.testing.assert_close(model(ids[:, 9:], cache=cache)[:, -1], want[:, -1], atol=1e-5, rtol=0)
    prompt = ids[0, :5].tolist()
    assert dsv2.generate(model, [prompt], 8, eos_token_id=[]) == dsv2.generate(plain, [prompt], 8, eos_token_id=[])


def test_expert_adapters_and_their_gradients_match_a_loop_over_experts():
    """The grouped GEMMs (values and gradients) against one product per expert: the definition, s B_j A_j x."""
    model, _ = model_and_ids()
    trained(model, "experts", r=3)
    e = next(m for _, m in adapted(model))
    x = torch.randn(7, e.base_layer.hidden)
    counts = torch.tensor([2, 0, 5] + [0] * (e.base_layer.n_experts - 3))
    got = e(x, counts)
    (got ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in e.named_parameters() if p.requires_grad}
    e.zero_grad()
    bounds, rows, r, s, b = [0, 2, 2, 7], [], e.r, e.scaling[0], e.base_layer
    for j in range(3):
        xs = x[bounds[j]:bounds[j + 1]]
        W, F = b.gate_up_proj[j], b.inter
        gate = xs @ W[:F].T + s * xs @ e.lora_A_gate_up[j, :r].T @ e.lora_B_gate[j].T
        up = xs @ W[F:].T + s * xs @ e.lora_A_gate_up[j, r:].T @ e.lora_B_up[j].T
        h = b.act(gate) * up
        rows.append(h @ b.down_proj[j].T + s * h @ e.lora_A_down[j].T @ e.lora_B_down[j].T)
    want = torch.cat(rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (want ** 2).sum().backward()
    for n, p in e.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5)
    assert grads["lora_B_down"][:3].abs().sum() > 0 and grads["lora_B_down"][3:].abs().sum() == 0


@given(st.lists(st.integers(-1, 3), min_size=1, max_size=20))
@settings(max_examples=40, deadline=None)
def test_row_groups_cover_each_adapted_row_once(slots):
    slot_T = torch.tensor(slots)
    groups = groups_of(slot_T)
    seen = torch.cat([idx for _, idx in groups]) if groups else torch.empty(0, dtype=torch.long)
    assert sorted(seen.tolist()) == [i for i, s in enumerate(slots) if s >= 0]
    assert all(bool((slot_T[idx] == s).all()) for s, idx in groups)


def test_rows_refuse_a_call_they_cannot_place():
    rows = Rows()
    rows.set(torch.tensor([0, -1, 1]))
    with pytest.raises(RuntimeError, match="Rows.call"):
        rows.groups(5)


def test_targets_by_group_and_name():
    model, _ = model_and_ids(q_lora_rank=32)
    names = lambda t: {n.split("layers.")[1].split(".", 1)[1] for n, _ in targeted(model, t)}  # noqa: E731
    assert names("attention") == {"self_attn." + n for n in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                              "kv_b_proj", "o_proj")}
    assert names("shared") == {"mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                               "mlp.shared_experts.down_proj"}
    assert names("dense") == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert names("experts") == {"mlp.experts"}
    assert names("o_proj,experts") == {"self_attn.o_proj", "mlp.experts"}
    assert not any("lm_head" in n or n.endswith(".gate") for n, _ in targeted(model, "all-linear"))
    with pytest.raises(ConfigError, match="neither a group"):
        parse_targets("attn")


# -- PEFT's format -----------------------------------------------------------------------------------------------
def test_adapter_folders_round_trip_in_peft_layout(tmp_path):
    model, ids = model_and_ids()
    trained(model, "attention,experts,shared", r=4)
    save_adapter(model, tmp_path, alpha=8.0, base="base-model")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == ("LORA", 4, 8.0,
                                                                                               "base-model")
    keys = read_adapter(tmp_path).pairs
    E, F = model.config.num_routed, model.config.moe_intermediate_size
    A, B = keys["model.layers.1.mlp.experts.3.up_proj"]
    assert A.shape == (4, model.config.hidden_size) and B.shape == (F, 4)
    assert sum(k.startswith("model.layers.1.mlp.experts.") for k in keys) == 3 * E
    fresh, _ = model_and_ids()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(fresh(ids), want, atol=1e-6, rtol=0)


def write_folder(path, tensors, **cfg):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **cfg}))
    if tensors is not None:
        save_file(tensors, path / "adapter_model.safetensors")
    return path


def good_pair(model, name="model.layers.0.self_attn.o_proj", r=4):
    """A PEFT pair of random A and B for a module (a routed expert's part by its per-expert name)."""
    if ".experts." in name:  # experts.{j}.gate_proj / up_proj: hidden -> moe_intermediate
        c = model.config
        shape = (c.hidden_size, c.moe_intermediate_size)
    else:
        lin = model.get_submodule(name)
        shape = (lin.in_features, lin.out_features)
    key = f"base_model.model.{name}"
    return {f"{key}.lora_A.weight": torch.randn(r, shape[0]), f"{key}.lora_B.weight": torch.randn(shape[1], r) / 10}


@pytest.mark.parametrize("case,message", [
    ("rank", "the config's rank for it is 8"),
    ("shape", "an adapter of another base model"),
    ("missing", "has lora_A but not lora_B"),
    ("pickled", "is pickled, which dsv2 never loads"),
    ("dora", "does not apply DoRA"),
    ("module", "not a module dsv2 adapts"),
    ("key", "is not a LoRA A/B weight"),
    ("lm_head", "not a module dsv2 adapts"),
    ("norm", "not a module dsv2 adapts"),
    ("fused", "per-expert pairs"),
    ("pattern", "rank_pattern key '\\(' is not a regular expression"),
    ("alpha", "alpha_pattern\\['o_proj'\\] must be a positive number"),
])
def test_bad_adapter_folders_refuse_with_one_line(tmp_path, case, message):
    model, _ = model_and_ids()
    t = good_pair(model)
    cfg = {}
    if case == "rank":
        cfg["r"] = 8
    elif case == "shape":
        t = good_pair(model_and_ids(hidden_size=96)[0])
    elif case == "missing":
        t.pop(next(k for k in t if "lora_B" in k))
    elif case == "pickled":
        t = None
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04")
    elif case == "dora":
        cfg["use_dora"] = True
    elif case == "module":
        t = {k.replace("layers.0", "layers.9"): v for k, v in t.items()}
    elif case == "key":
        t["base_model.model.model.layers.0.self_attn.o_proj.lora_magnitude_vector"] = torch.ones(3)
    elif case == "lm_head":
        t = good_pair(model, "lm_head")
    elif case == "norm":
        t = {"base_model.model.model.norm.lora_A.weight": torch.randn(4, 4),
             "base_model.model.model.norm.lora_B.weight": torch.randn(4, 4)}
    elif case == "fused":
        t = {"base_model.model.model.layers.1.mlp.experts.lora_A.weight": torch.randn(4, 4),
             "base_model.model.model.layers.1.mlp.experts.lora_B.weight": torch.randn(4, 4)}
    elif case == "pattern":
        cfg["rank_pattern"] = {"(": 4}
    elif case == "alpha":
        cfg["alpha_pattern"] = {"o_proj": "8"}
    folder = write_folder(tmp_path / "a", t, **cfg)
    with pytest.raises(AdapterError, match=message) as err:
        load_adapter(model, folder)
    assert "\n" not in str(err.value)


# -- with PEFT and transformers (test extra) ---------------------------------------------------------------------
def hf_base(tmp_path, seed=0):
    transformers = pytest.importorskip("transformers")
    from test_parity_hf import hf_config, saved_reference

    torch.manual_seed(seed)
    ref = saved_reference(hf_config(24, "group_limited_greedy", 1, False, seed), tmp_path / "base")
    return transformers, ref


@pytest.mark.parametrize("targets", ["attention", "attention,experts"])
def test_peft_loads_dsv2_adapters_with_dsv2s_logits(tmp_path, targets):
    """PEFT (0.21) on transformers 5 takes attention adapters as they are and the per-expert ones by fusing them
    into its stacked experts' adapters (PEFT's MoE conversion)."""
    peft = pytest.importorskip("peft")
    _, ref = hf_base(tmp_path)
    model = trained(dsv2.from_pretrained(tmp_path / "base"), targets, r=4, std=0.1)
    save_adapter(model, tmp_path / "adapter", alpha=8.0, base=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    ids = torch.randint(2, 128, (2, 24))
    with torch.no_grad():
        want = peft_model(ids).logits
        with peft_model.disable_adapter():
            assert (want - peft_model(ids).logits).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(model(ids), want, atol=1e-4, rtol=0)


def test_dsv2_loads_what_peft_writes(tmp_path):
    peft = pytest.importorskip("peft")
    _, ref = hf_base(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_b_proj", "kv_b_proj", "o_proj"],
                          rank_pattern={"o_proj": 2}, init_lora_weights=False)
    peft_model = peft.get_peft_model(ref, cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = load_adapter(dsv2.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    ids = torch.randint(2, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), peft_model(ids).logits, atol=1e-4, rtol=0)


def test_merged_checkpoints_run_in_transformers_as_the_adapter_does_in_dsv2(tmp_path):
    """Adapters PEFT does not apply on transformers 5 (the dense MLP and the shared experts: PEFT maps gate_proj /
    up_proj / down_proj to the fused routed experts only) reach transformers through the merged checkpoint."""
    transformers, _ = hf_base(tmp_path)
    model = trained(dsv2.from_pretrained(tmp_path / "base"), "dense,shared,experts,kv_b_proj", r=4, std=0.1)
    save_adapter(model, tmp_path / "adapter", alpha=8.0)
    from dsv2.cli import main

    assert main(["merge-lora", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(2, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), merged(ids).logits, atol=1e-4, rtol=0)


def test_the_adapter_a_model_holds_reads_back_as_it_was():
    model, _ = model_and_ids()
    trained(model, "all-linear", r=2)
    a = adapter_of(model, alpha=4.0)
    fresh, _ = model_and_ids()
    add_lora(fresh, "all-linear", r=2)
    from dsv2.lora import put_adapter

    put_adapter(fresh, a, 0)
    b = adapter_of(fresh, alpha=4.0)
    assert a.pairs.keys() == b.pairs.keys()
    assert all(torch.equal(a.pairs[k][i], b.pairs[k][i]) for k in a.pairs for i in (0, 1))


def test_an_adapter_saved_back_computes_what_it_loaded(tmp_path):
    """Per-module scales (rank_pattern, alpha_pattern, rsLoRA) survive a load and a save: folded into B."""
    model, ids = model_and_ids()
    t = {**good_pair(model, "model.layers.0.self_attn.o_proj", 2),
         **good_pair(model, "model.layers.1.mlp.experts.2.up_proj")}
    write_folder(tmp_path / "in", t, rank_pattern={"o_proj": 2}, alpha_pattern={"up_proj": 3}, use_rslora=True)
    a = load_adapter(copy.deepcopy(model), tmp_path / "in")
    save_adapter(a, tmp_path / "out", alpha=8.0)
    b = load_adapter(copy.deepcopy(model), tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), atol=1e-5, rtol=0)
        assert (a(ids) - model(ids)).abs().max() > 1e-3


def test_quantized_experts_shard_with_their_adapters(kernels):
    """LoRA on a quantized base under expert parallelism: each rank keeps its experts' rows and adapters."""
    from dsv2.quant.convert import quantize_model
    from dsv2.quant.recipe import Recipe

    model, _ = model_and_ids()
    quantize_model(model, Recipe.build("int8", None))
    trained(model, "experts", r=2)
    e = next(m for _, m in adapted(model))
    x, counts = torch.randn(5, e.base_layer.hidden), torch.tensor([2, 3] + [0] * (e.base_layer.n_experts - 2))
    with torch.no_grad():
        want = e(x, counts)
    params = e.shard(0, 2)
    assert e.base_layer.n_experts == 2 and e.base_layer.gate_up_proj_q.shape[0] == 2
    assert all(p.shape[0] == 2 for p in params) and len(params) == 5  # the five adapter stacks; the rows are buffers
    with torch.no_grad():
        torch.testing.assert_close(e(x, counts[:2]), want, atol=1e-6, rtol=0)

