"""Weight-only int8/int4 quantization (dsv2.quant): formats, kernels, quantized models, checkpoints, errors.

Tolerances: the kernels against the ops' reference (the same dequantized fp32 weight, another summation order)
within 1e-5 of the result's magnitude; a quantized model against the float model whose weights are the dequantized
ones (so only the summation order differs) within 1e-5 of the logits' magnitude (fp32); against the original float
model, int8 within 6% and int4 within 60% of the logits' norm (the quantization error itself, measured at about
half that on random models, whose errors grow through the layers and flip routing more than a trained model's:
benchmarks/quant_accuracy.py measures a trained one); save/load and dsv2 quantize bit-exact.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_model, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv2
from dsv2 import Engine, SamplingParams, from_pretrained, generate, save_pretrained
from dsv2.checkpoint.quantize import quantize_checkpoint
from dsv2.cpu import ops
from dsv2.cpu.decode_step import DecodeStep
from dsv2.errors import CheckpointError, ConfigError
from dsv2.quant.convert import quantize_model
from dsv2.quant.formats import (
    INT4_CLIPS,
    Scheme,
    block_format,
    dequantize,
    from_blocks,
    pack_int32,
    quantize,
    quantize_reference,
    to_blocks,
    unpack_int32,
)
from dsv2.quant.modules import QuantLinear, QuantRoutedExperts
from dsv2.quant.recipe import Recipe

SCHEMES = [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64)]


def close(got, want, rel):
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= rel * scale, (got.float() - want.float()).abs().max() / scale


# ---------------------------------------------------------------------------------------------------------------
# formats
@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(SCHEMES), rows=st.integers(1, 6), groups=st.integers(1, 4),
       log_scale=st.floats(-8, 4), seed=st.integers(0, 2**16))
def test_round_trip_error_bounds(method, rows, groups, log_scale, seed):
    """int8: every value within half a step (plus the bf16 rounding of the scale); int4: each group's squared error
    at most that of plain absmax scaling (the search picks the least-error scale, and that one is a candidate)."""
    scheme = Scheme.parse(*method)
    K = (scheme.group or 32) * groups
    g = scheme.group or K
    w = torch.randn(rows, K, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    q, scale = quantize(w, scheme)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (rows, w.shape[1] // g)
    err = (dequantize(q, scale) - w).reshape(rows, -1, g)
    wg = w.reshape(rows, -1, g)
    amax = wg.abs().amax(-1, keepdim=True)
    if scheme.bits == 8:
        assert int(q.min()) >= -128 and int(q.max()) <= 127
        assert bool((err.abs() <= scale.float()[..., None] / 2 + amax * 2**-8 + 1e-30).all())
    else:
        assert int(q.min()) >= -8 and int(q.max()) <= 7
        s = (amax * (INT4_CLIPS[0] / 7.5)).to(torch.bfloat16).float()  # plain absmax: max|w| -> 7
        s = torch.where(s > 0, s, torch.ones_like(s))
        plain = (torch.round(wg / s).clamp(-8, 7) * s - wg).square().sum(-1)
        assert bool((err.square().sum(-1) <= plain * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("method,group", SCHEMES)
def test_layouts_round_trip_exactly(method, group):
    scheme = Scheme.parse(method, group)
    w = torch.randn(2, 5, 128)
    q, scale = quantize(w, scheme)
    blocks = to_blocks(q, scale, scheme.bits)
    assert blocks.dtype == torch.uint8 and blocks.shape == (2, 5, scheme.row_bytes(128))
    assert block_format(128, blocks.shape[-1]) == (scheme.bits, scheme.group or 128)
    q2, s2 = from_blocks(blocks, 128)
    assert torch.equal(q2, q) and torch.equal(s2, scale)
    for e in range(2):
        assert torch.equal(unpack_int32(pack_int32(q[e], scheme.bits), scheme.bits, 128), q[e])


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors(bits):
    """pack_int32 writes what compressed-tensors' own packer writes (its pack-quantized format)."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 96), dtype=torch.int8)
    assert torch.equal(pack_int32(q, bits), helpers.pack_to_int32(q, bits))
    assert torch.equal(helpers.unpack_from_int32(pack_int32(q, bits), bits, torch.Size([7, 96])), q)


def test_bad_schemes_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown quantization method 'int3'"):
        Scheme.parse("int3")
    with pytest.raises(ConfigError, match="multiple of 32"):
        Scheme.parse("int4", 48)
    with pytest.raises(ConfigError, match="group size 64 does not fit w with 96 input columns"):
        Scheme.parse("int4", 64).group_of(96, "w")
    with pytest.raises(ConfigError, match="unknown module family 'mlp'"):
        Recipe.build("int4", families={"mlp": "int8"})


# ---------------------------------------------------------------------------------------------------------------
# kernels
@pytest.mark.usefixtures("kernels")
@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(SCHEMES), counts=st.lists(st.integers(0, 5), min_size=1, max_size=5),
       rows=st.integers(1, 70), blocks=st.integers(1, 4), x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_rows_dot_on_quantized_rows_is_the_reference(method, counts, rows, blocks, x_dtype, seed):
    """Grouped (ragged expert groups, empty ones included) and plain products: the kernel == the dequantized
    reference."""
    scheme = Scheme.parse(*method)
    K = (scheme.group or 64) * blocks
    g = torch.Generator().manual_seed(seed)
    w = to_blocks(*quantize(torch.randn(len(counts), rows, K, generator=g), scheme), scheme.bits)
    N = sum(counts)
    x = torch.randn(max(N, 1), K, generator=g).to(x_dtype)
    if N:
        ends = torch.tensor(counts).cumsum(0)
        got = ops.rows_dot(x[:N], w, ends)
        want = ops._rows_dot(x[:N], w, ends)
        assert got.dtype == x_dtype
        close(got, want, 1e-5 if x_dtype == torch.float32 else 2**-8)
    got = ops.rows_dot(x, w[0])
    close(got, ops._rows_dot(x, w[0]), 1e-5 if x_dtype == torch.float32 else 2**-8)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("method,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_kernel_is_the_reference(method, group, dtype):
    """The C++ quantizer (what loading runs) computes the reference's integers and scales; int4's choice between
    candidate scales may differ only where two candidates' errors tie up to summation order."""
    scheme = Scheme.parse(method, group)
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    got = from_blocks(ops.quantize_rows(w, scheme.bits, scheme.group, list(INT4_CLIPS)), 256)
    want = quantize_reference(w, scheme)
    if scheme.bits == 8:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    g = scheme.group or 256
    err = [(dequantize(*qs) - w.float()).reshape(64, -1, g).square().sum(-1) for qs in (got, want)]
    assert bool((err[0] <= err[1] * (1 + 1e-5)).all())
    assert (got[0] == want[0]).float().mean() > 0.99


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("method,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_is_exact(method, group, dtype):
    scheme = Scheme.parse(method, group)
    w = to_blocks(*quantize(torch.randn(3, 40, 256), scheme), scheme.bits)
    assert torch.equal(ops.dequantize(w, 256, dtype), ops._dequantize(w, 256, dtype))
    assert torch.equal(ops.dequantize(w[1], 256, dtype), ops._dequantize(w[1], 256, dtype))


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("method,group", SCHEMES)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_rows_combine_on_quantized_rows_is_the_reference(method, group, M):
    scheme = Scheme.parse(method, group)
    w = to_blocks(*quantize(torch.randn(4, 24, 128), scheme), scheme.bits)
    x = torch.randn(4, 24, M)
    close(ops.rows_combine(x, w, 128), ops._rows_combine(x, w, 128), 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# quantized models
def _pair(method="int8", group=None, seed=0, **overrides):
    """(quantized model, the float model holding its dequantized weights): equal up to summation order."""
    model = random_model(tiny_config(**overrides), seed, norms=True)
    dense = random_model(tiny_config(**overrides), seed, norms=True)
    quantize_model(model, Recipe.build(method, group))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                dense.get_submodule(name).weight.copy_(m.weight)
            elif isinstance(m, QuantRoutedExperts):
                dense.get_submodule(name).gate_up_proj.copy_(m.gate_up_proj)
                dense.get_submodule(name).down_proj.copy_(m.down_proj)
    return model, dense


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("method,group,overrides", [
    ("int8", None, {}), ("int4", None, {}), ("int8", 32, dict(q_lora_rank=None, topk_method="greedy")),
    ("int4", 64, dict(q_lora_rank=None, first_k_dense_replace=0, norm_topk_prob=True))])
def test_quantized_model_is_its_dequantized_model(method, group, overrides):
    """Prefill (many rows: dequantized GEMMs), a decode step module by module (few rows: the kernels) and the fused
    decode step all give the logits of the float model that holds the dequantized weights."""
    model, dense = _pair(method, group, **overrides)
    ids = torch.randint(2, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        close(model(ids), dense(ids), 1e-5)
        caches = [m.new_cache(2, 24) for m in (model, dense)]
        for m, c in zip((model, dense), caches, strict=True):
            m(ids, cache=c)
        new, pos = ids[:, :1], torch.full((2, 1), 20)
        fused = copy.deepcopy(caches[0])
        plain = model(new, positions=pos, cache=caches[0])[:, -1]
        want = dense(new, positions=pos, cache=caches[1])[:, -1]
        step = DecodeStep(model)
        assert step.reason is None and step.applies(2)
        got = step(new, pos, fused)
    close(plain, want, 1e-5)
    close(got, want, 1e-5)
    close(fused.storage, caches[1].storage, 1e-5)


@pytest.mark.usefixtures("kernels")
def test_quantized_generation_matches_through_generate_and_the_engine():
    model, dense = _pair("int4")
    prompts = [[3, 5, 7, 9], [11, 2, 4]]
    want = generate(dense, prompts, max_new_tokens=10)
    assert generate(model, prompts, max_new_tokens=10) == want
    engine = Engine(model, max_num_seqs=4)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want


def test_quantized_model_is_near_the_float_model():
    model = random_model(tiny_config(), 0, std=0.05, norms=True)
    ids = torch.randint(2, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids)
        for method, rel in (("int8", 0.06), ("int4", 0.6)):
            q = quantize_model(random_model(tiny_config(), 0, std=0.05, norms=True), Recipe.build(method))
            assert (q(ids) - want).norm() <= rel * want.norm()


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_pretrained(random_model(tiny_config(), 0, std=0.05, norms=True), path)
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_save_load_round_trip_is_bit_exact(float_ckpt, tmp_path, method):
    """Quantizing while loading == quantizing in memory; saving and loading again changes no byte; dsv2 quantize
    writes the same tensors save_pretrained writes; config.json records the compressed-tensors recipe."""
    loaded = from_pretrained(float_ckpt, quantize=method)
    in_memory = quantize_model(from_pretrained(float_ckpt), Recipe.build(method))
    want = loaded.state_dict()
    assert all(torch.equal(want[k], v) for k, v in in_memory.state_dict().items())
    save_pretrained(loaded, tmp_path / "saved")
    again = from_pretrained(tmp_path / "saved").state_dict()
    assert want.keys() == again.keys() and all(torch.equal(want[k], again[k]) for k in want)
    stats = quantize_checkpoint(float_ckpt, tmp_path / "cli", Recipe.build(method), progress=False)
    assert stats["quantized"] > 0 and stats["bytes_out"] < stats["bytes_in"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "saved" / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cli" / "tokenizer_config.json").exists()
    qc = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_packed" in a and "lm_head.weight" in a


def test_other_tools_load_the_quantized_checkpoint(float_ckpt, tmp_path):
    """transformers with compressed-tensors loads dsv2's int4 checkpoint, routed experts included, with the logits of
    dsv2's quantized model."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    quantize_checkpoint(float_ckpt, tmp_path, Recipe.build("int4"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mine = from_pretrained(tmp_path)
    ids = torch.randint(2, mine.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        close(hf(ids).logits, mine(ids), 1e-5)


def test_bad_checkpoints_and_requests(float_ckpt, tmp_path):
    quantize_checkpoint(float_ckpt, tmp_path / "q", Recipe.build("int8"), progress=False)
    with pytest.raises(CheckpointError, match="already quantized .*load it without quantize"):
        from_pretrained(tmp_path / "q", quantize="int4")
    with pytest.raises(CheckpointError, match="already quantized .*quantize its float original"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", Recipe.build("int4"))
    with pytest.raises(CheckpointError, match="group size 64 does not fit .*q_b_proj with 96 input columns"):
        from_pretrained(float_ckpt, quantize=Recipe.build("int4", 64))
    # a part missing: the weight cannot be rebuilt
    from safetensors.torch import load_file, save_file

    t = load_file(tmp_path / "q" / "model.safetensors")
    del t["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(t, tmp_path / "q" / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.weight' lacks model.layers.0.self_attn.o_proj.weight_scale"):
        from_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="method 'gptq' is not supported"):
        from_pretrained(tmp_path / "q")


def test_cli_quantize_generate_and_errors(float_ckpt, tmp_path):
    def run(*a):
        return subprocess.run([sys.executable, "-m", "dsv2", *a], capture_output=True, text=True, timeout=300)

    p = run("quantize", str(float_ckpt), str(tmp_path / "q4"), "--method", "int4", "--quiet")
    assert p.returncode == 0 and "weights quantized (int4/g32" in p.stderr, p.stderr
    a = run("generate", "--model", str(tmp_path / "q4"), "--ids", "3,4,5", "--max-new-tokens", "6")
    b = run("generate", "--model", str(float_ckpt), "--ids", "3,4,5", "--max-new-tokens", "6", "--quantize", "int4")
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout.split()) == 6, a.stderr
    for args, msg in [(("generate", "--model", str(float_ckpt), "--ids", "1", "--quantize", "int3"),
                       "invalid choice: 'int3'"),
                      (("quantize", str(float_ckpt), str(tmp_path / "x"), "--method", "int4", "--group-size", "40"),
                       "group size 40 must be 0"),
                      (("quantize", str(tmp_path / "q4"), str(tmp_path / "y"), "--method", "int8"),
                       "already quantized"),
                      (("generate", "--model", str(float_ckpt), "--ids", "1", "--group-size", "64"),
                       "--group-size applies with --quantize")]:
        p = run(*args)
        last = p.stderr.strip().splitlines()[-1]  # above it argparse's usage, for its own errors
        assert p.returncode == 2 and msg in last and "Traceback" not in p.stderr, p.stderr
        assert last.startswith(f"dsv2 {args[0]}: error:") and p.stderr.count("error:") == 1


def test_an_fp16_quantized_model_runs_and_round_trips(tmp_path):
    """fp16 activations take the dequantizing path (the kernels take fp32/bf16 x); its scales are stored as bf16,
    so saving and loading changes no byte even where fp16 would make small scales subnormal."""
    model = random_model(tiny_config(), 0, std=2e-5).half()
    save_pretrained(model, tmp_path / "f16")
    q = from_pretrained(tmp_path / "f16", quantize="int4")
    assert len(generate(q, [[3, 4, 5]], max_new_tokens=3)[0]) == 3
    save_pretrained(q, tmp_path / "q16")
    again = from_pretrained(tmp_path / "q16").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in q.state_dict().items())


def test_training_refuses_a_quantized_checkpoint(float_ckpt, tmp_path):
    quantize_checkpoint(float_ckpt, tmp_path / "q", Recipe.build("int8"), progress=False)
    p = subprocess.run([sys.executable, "-m", "dsv2", "train", "--init-from", str(tmp_path / "q"), "--out",
                        str(tmp_path / "run"), "--max-steps", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "is quantized" in p.stderr and "Traceback" not in p.stderr, p.stderr


PEAK_SCRIPT = """
import resource, sys, torch
import dsv2
model = dsv2.from_pretrained(sys.argv[1], quantize=sys.argv[2])
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, held)
"""


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_loading_quantized_never_holds_the_float_model(tmp_path, method):
    """A 250 MB fp32 checkpoint (almost all routed experts) loads quantized with a peak RSS of the process
    baseline + the quantized model + well under the float model: tensor by tensor, no float copy of the model."""
    cfg = tiny_config(n_routed_experts=64, moe_intermediate_size=512, hidden_size=512, num_hidden_layers=2,
                      first_k_dense_replace=0, num_attention_heads=4)
    model = dsv2.DeepseekV2(cfg)
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_pretrained(model, tmp_path, max_shard_bytes=64 << 20)
    del model
    base = subprocess.run([sys.executable, "-c", "import resource, torch, dsv2, dsv2.checkpoint, dsv2.cpu.ops; "
                           "dsv2.cpu.ops.load_kernels(); "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                          capture_output=True, text=True, check=True)
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), method], capture_output=True, text=True,
                       check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak, held = map(int, p.stdout.split())
    assert float_bytes > 200 << 20
    extra = peak - int(base.stdout) - held
    assert extra < 0.25 * float_bytes, (peak, held, float_bytes)
