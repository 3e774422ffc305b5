"""Shared pieces: the benchmark model shape, the stamp, timing, the shared checkpoint, loaders, machine limits."""

from __future__ import annotations

import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv2
from dsv2.checkpoint import save_pretrained
from dsv2.config import ModelConfig
from dsv2.cpu.ops import cpu_name
from dsv2.presets import get_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# V2-Lite's attention shape (no query compression, kv_lora_rank 512, RoPE 64, nope 128, v 128, YaRN) and MoE
# shape (greedy top-6 of fine-grained experts + 2 shared, first layer dense), scaled down in width, depth, heads,
# experts and vocabulary so that a 2-core CPU decodes it at 8K context in reasonable time: 220M parameters
# (880 MB fp32), ~80M activated per token.
BENCH_OVERRIDES = dict(vocab_size=16384, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=32,
                       bos_token_id=0, eos_token_id=1)


def bench_config() -> ModelConfig:
    return get_config("deepseek-v2-lite", **BENCH_OVERRIDES)


def describe_config(cfg: ModelConfig) -> str:
    q = "none" if cfg.q_lora_rank is None else cfg.q_lora_rank
    return (f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
            f"{cfg.num_attention_heads} heads, q_lora {q}, kv_lora {cfg.kv_lora_rank}, rope {cfg.qk_rope_head_dim}, "
            f"nope {cfg.qk_nope_head_dim}, v {cfg.v_head_dim}, {cfg.n_routed_experts} routed experts "
            f"(top-{cfg.num_experts_per_tok}, {cfg.topk_method}) + {cfg.n_shared_experts} shared of width "
            f"{cfg.moe_intermediate_size}, dense FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}")


# ---------------------------------------------------------------------------------------------------------------
# stamp
def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran this benchmark, as a reader can paste it."""
    return " ".join([f"python -m {module}", *(shlex.quote(a) for a in (argv or sys.argv[1:]))])


def stamp(threads: int) -> dict:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = "not installed"
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": tf_version,
        "dsv2": dsv2.__version__,
        "python": platform.python_version(),
        "load_start": round(loadavg(), 2),
    }


# ---------------------------------------------------------------------------------------------------------------
# timing
@dataclass
class Timing:
    median_s: float
    min_s: float
    n: int
    samples: list[float] = field(default_factory=list)

    @property
    def best_ms(self) -> float:
        """The figure reported: the best of n (the least disturbed by other tenants of a shared machine)."""
        return self.min_s * 1e3


def measure(fn: Callable[[], object], **kw) -> Timing:
    """Median and best wall time of fn() (`measure_peers` with one peer: same warm-up, stopping and slow rules)."""
    return measure_peers({"fn": fn}, **kw)["fn"]


def measure_peers(fns: dict[str, Callable[[], object]], *, setup: dict[str, Callable[[], object]] | None = None,
                  warmup: int = 1, min_iters: int = 3, max_iters: int = 10, min_time: float = 1.0,
                  max_time: float = 20.0, slow: float = 8.0) -> dict[str, Timing]:
    """Wall times of several peers, in rounds: every round gives each peer about the same wall time (a
    peer 20x faster than the slowest runs up to 20 times), so a slow spell of a shared host (other tenants' memory
    traffic moves these figures by tens of percent) hits all peers alike and the ratios stay fair. A peer whose
    first call takes over `slow` seconds keeps it as its only sample (its one-off costs are negligible at that
    size); peers stop at `max_iters` samples, all stop once each has `min_iters` and `min_time` per peer has passed,
    or after `max_time` per peer.
    `setup[peer]` runs untimed before each of that peer's calls (e.g. switching transformers' experts
    implementation on a shared model)."""
    setup = setup or {}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    cost: dict[str, float] = {}
    done: set[str] = set()

    def call(k: str) -> float:
        if k in setup:
            setup[k]()
        t0 = time.perf_counter()
        fns[k]()
        return time.perf_counter() - t0

    for k in fns:
        for i in range(max(warmup, 1)):
            cost[k] = call(k)
            if i == 0 and cost[k] > slow:
                samples[k].append(cost[k])
                done.add(k)
                break
    start = time.perf_counter()
    budget = max_time * max(len(fns) - len(done), 1)
    while len(done) < len(fns):
        slowest = max(cost[k] for k in fns if k not in done)
        for k in fns:
            for _ in range(max(1, int(slowest / max(cost[k], 1e-9)))):
                if k in done:
                    break
                samples[k].append(call(k))
                if len(samples[k]) >= max_iters:
                    done.add(k)
        spent = time.perf_counter() - start
        if (min(len(v) for v in samples.values()) >= min_iters and spent >= min_time * len(fns)) or spent >= budget:
            break
    return {k: Timing(statistics.median(v), min(v), len(v), v) for k, v in samples.items()}


def free_memory() -> None:
    gc.collect()


# ---------------------------------------------------------------------------------------------------------------
# the shared checkpoint and the two loaders
def checkpoint(workdir: Path, name: str, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write a randomly initialised dsv2 model once with save_pretrained; reuse it when the config matches."""
    path = Path(workdir) / name
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        have = ModelConfig.from_json(path).to_dict()
        if have.pop("torch_dtype", None) in (None, "float32") and have == cfg.to_dict():  # save_pretrained's
            return path
    torch.manual_seed(seed)
    model = dsv2.DeepseekV2(cfg)
    save_pretrained(model, path)
    del model
    free_memory()
    return path


def load_dsv2(path: Path, dtype: torch.dtype) -> dsv2.DeepseekV2:
    return dsv2.from_pretrained(path, dtype=dtype).eval()


def hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def load_hf(path: Path, dtype: torch.dtype, experts: str = "grouped_mm"):
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype,
                                                                     experts_implementation=experts)
    return model.eval()


def set_hf_experts(model, experts: str) -> None:
    model.set_experts_implementation(experts)
    assert model.config._experts_implementation == experts, model.config._experts_implementation


# ---------------------------------------------------------------------------------------------------------------
# machine limits
def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Best-of-N read bandwidth (sum of a 1 GiB fp32 tensor) and copy bandwidth (read + write), GB/s, for the run's
    stamp. (Each batch-1 decode cell times its own read bound next to its peers: see decode.READ_PROBE.)"""
    x = torch.ones(nbytes // 4)
    y = torch.empty_like(x)
    read = copy = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        read = max(read, nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        y.copy_(x)
        copy = max(copy, 2 * nbytes / (time.perf_counter() - t0) / 1e9)
    del x, y
    free_memory()
    return {"read_GBps": read, "copy_GBps": copy}


def read_probe(nbytes: int, buffers: int = 2) -> Callable[[], object]:
    """A callable that sums `nbytes` of fp32 from memory: each call reads the next of `buffers` buffers of that size
    (each larger than the last-level cache for a decode step's bytes, so every read comes from DRAM)."""
    pool = [torch.ones(max(nbytes // 4, 1)) for _ in range(buffers)]
    turn = itertools.cycle(pool)
    return lambda: next(turn).sum()


def matmul_peak(dtype: torch.dtype, shapes=((2048, 1024, 4096), (4096, 1024, 1024), (2048, 2048, 2048))) -> dict:
    """Best dense F.linear throughput (GFLOP/s) over a few large shapes: M x K inputs, N x K weight."""
    best, best_shape = 0.0, None
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype)
        w = torch.randn(n, k, dtype=dtype)
        t = measure(lambda a=a, w=w: F.linear(a, w), warmup=1, min_iters=3, max_iters=5, min_time=0.5,
                    max_time=10.0)
        gf = 2 * m * k * n / t.min_s / 1e9
        if gf > best:
            best, best_shape = gf, (m, k, n)
    return {"GFLOPs": best, "shape_MKN": best_shape}


def best_limits(a: dict, b: dict) -> dict:
    """Per figure, the better of two measurements of the machine's limits (start and end of a run)."""
    bw = {k: max(a["bandwidth"][k], b["bandwidth"][k]) for k in a["bandwidth"]}
    peak = {d: max(a["matmul_peak"][d], b["matmul_peak"][d], key=lambda p: p["GFLOPs"]) for d in a["matmul_peak"]}
    return {"bandwidth": bw, "matmul_peak": peak, "measured": {"start": a, "end": b}}


def to_jsonable(obj):
    if isinstance(obj, Timing):
        return asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def replace_section(readme: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the markers `begin` and `end` in readme with body (SystemExit if they are absent)."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} markers: add them where the section goes")
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1])


def logger() -> Callable[[str], None]:
    """print with the seconds since this call, flushed (long benchmarks' progress lines)."""
    t0 = time.time()
    return lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)


def write_results(out: Path, stem: str, res: dict, table: str, note: str = "") -> None:
    """out/stem.json (everything) and out/stem.md (the command, the CPU, the table); the table printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(to_jsonable(res), indent=2))
    (out / f"{stem}.md").write_text(f"{res['command']}\n\nCPU: {res['cpu']}{note}\n\n{table}\n")
    print(table)
