"""The six ablation suites: what each trains, what it claims, and how much it trains.

Every variant is the `tiny` preset (d = 128, 4 layers, vocab 4096) with a few fields changed, so a suite's variants
differ only in the mechanism under test. Where the paper compares at matched size, the variants are matched
(checked from dsv2.tools.info's counts, as `dsv2 info` prints them):

- attention (DeepSeek-V2 Appendix D.1-D.2, Table 1): MLA, MHA, GQA with 4 and 2 KV groups, MQA; 8 heads so the
  GQA groups differ from MHA and MQA; every layer dense, and each variant's FFN width set so that its total
  parameters equal MLA's (attention parameters saved or spent go to the FFN, as the paper's matched models do);
- rope (the question the article this project started from leaves open): the decoupled RoPE width d_h^R in
  {8, 16, 32, 64} at a fixed query/key head width d_h + d_h^R = 96 (32 is V2's ratio, 64 : 128), matched the same way;
- moe (DeepSeekMoE, arXiv 2401.06066, Sec. 4-5): fine-grained + shared experts vs GShard-style top-2 of six wide
  experts vs a dense FFN, plus "no shared experts" and "coarser experts", all with the same activated FFN width
  (384) and, the dense model aside, the same total expert width (18 x 64 = 6 x 192 = 9 x 128);
- routing (V2 Sec. 2.2.2): 32 experts on D = 8 device groups, top-4 inside the M best groups, M in {1, 2, 3, 4, 8}
  (M = 8 is unrestricted top-K);
- balance (V2 Sec. 2.2.3-2.2.4): the routing suite's model at M = 3 with and without the device- and
  communication-level losses, and with and without device-level token dropping (capacity factor 1.0);
- upcycle (the article's recipe, training/upcycle.py): a dense model trained, then upcycled to DeepSeekMoE (its shared
  experts take the dense FFN whole), against a randomly initialised MoE and the dense model trained on, each for the
  same steps after the dense stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..presets import get_config
from ..tools.info import describe

PRESET = "tiny"
VAL_FRACTION = 0.04
"""4% of the documents as validation text: at the default --max-bytes a few dozen thousand tokens, so a loss
difference of a few hundredths of a nat is not the noise of a handful of windows."""


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    model: dict[str, Any]
    """ModelConfig fields changed from the tiny preset."""
    train: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields changed from the suite's budget."""
    start: tuple[str, str] | None = None
    """("upcycle" | "continue", base variant): start from the base variant's final checkpoint of the same seed,
    upcycled to this variant's config or as it is."""


@dataclass(frozen=True)
class Claim:
    text: str
    source: str
    a: str
    b: str
    relation: str
    """"lower": a's metric is below b's; "not_higher": a's metric is not above b's (an "about as good" claim)."""
    metric: str = "val_loss"


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    variants: tuple[Variant, ...]
    claims: tuple[Claim, ...]
    columns: tuple[str, ...] = ()
    """Measured columns the report shows besides parameters, KV bytes per token and the validation loss
    (report.COLUMNS)."""
    matched_to: str | None = None
    """The variant whose total parameters the others' FFN width is solved to match."""
    reference: str = ""
    """The variant the plot subtracts (default: the first)."""

    def __post_init__(self) -> None:
        if not self.reference:
            object.__setattr__(self, "reference", self.variants[0].name)

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


@dataclass(frozen=True)
class Budget:
    """How much each run trains. The default runs the six suites in about an hour on 2 CPU cores (README); --quick
    runs every code path in minutes; on a GPU, raise --steps, --batch-size, --seq-len and --max-bytes."""

    steps: int = 150
    batch_size: int = 16
    seq_len: int = 256
    max_bytes: int = 6_000_000
    eval_batches: int = 8
    decode_context: int = 512
    decode_tokens: int = 48
    traffic_tokens: int = 8192

    def __post_init__(self) -> None:
        for k in FLAG_FIELDS:
            least = 2 if k == "seq_len" else 1
            if getattr(self, k) < least:
                raise ValueError(f"--{k.replace('_', '-')} must be >= {least}, got {getattr(self, k)}")

    @property
    def warmup_steps(self) -> int:
        return max(1, self.steps // 5)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // 5)

    @property
    def save_every(self) -> int:
        """Five checkpoints a run (the last one kept): a crash loses a fifth of a run at most."""
        return max(1, self.steps // 5)


FLAG_FIELDS = ("steps", "batch_size", "seq_len", "max_bytes")
"""Budget fields `dsv2 ablate` takes as flags (the rest follow from --quick)."""


DEFAULT_BUDGET = Budget()
QUICK_BUDGET = Budget(steps=10, batch_size=8, seq_len=128, max_bytes=1_000_000, eval_batches=2, decode_context=128,
                      decode_tokens=12, traffic_tokens=1024)


def match_parameters(model: dict[str, Any], target: int) -> dict[str, Any]:
    """`model` with intermediate_size (the dense FFN width) set so the total parameters are as close to `target` as
    whole FFN units allow (the count is linear in the width: 3 d per unit and dense layer)."""
    def total(width: int) -> int:
        return describe(get_config(PRESET, **{**model, "intermediate_size": width}))["parameters"]["total"]

    width = get_config(PRESET, **model).intermediate_size
    per_unit = total(width + 1) - total(width)
    if per_unit <= 0:
        raise ValueError("match_parameters needs a dense FFN to resize")
    return {**model, "intermediate_size": max(1, width + round((target - total(width)) / per_unit))}


def _matched(suite: Suite) -> Suite:
    """The suite with every variant's FFN width solved to match `matched_to`'s total parameters."""
    ref = suite.variant(suite.matched_to)
    target = describe(get_config(PRESET, **ref.model))["parameters"]["total"]
    variants = tuple(v if v is ref else dataclasses.replace(v, model=match_parameters(v.model, target))
                     for v in suite.variants)
    return dataclasses.replace(suite, variants=variants)


def _attention() -> Suite:
    dense = {"n_routed_experts": 0, "num_attention_heads": 8, "num_key_value_heads": 8}
    v = (
        Variant("mla", "MLA (d_c 64, d_h^R 16)", dense),
        Variant("mha", "MHA (8 KV heads)", {**dense, "attention_type": "mha"}),
        Variant("gqa4", "GQA (4 KV groups)", {**dense, "attention_type": "gqa", "num_key_value_heads": 4}),
        Variant("gqa2", "GQA (2 KV groups)", {**dense, "attention_type": "gqa", "num_key_value_heads": 2}),
        Variant("mqa", "MQA (1 KV head)", {**dense, "attention_type": "mqa"}),
    )
    claims = (
        Claim("MLA performs better than MHA at matched parameters, with a far smaller KV cache",
              "V2 Appendix D.2", "mla", "mha", "lower"),
        Claim("MHA performs better than GQA", "V2 Appendix D.1", "mha", "gqa2", "lower"),
        Claim("MHA performs better than MQA", "V2 Appendix D.1", "mha", "mqa", "lower"),
        Claim("MLA performs better than MQA, whose KV cache is about as small", "V2 Table 1 and Appendix D",
              "mla", "mqa", "lower"),
    )
    return _matched(Suite("attention", "MLA vs MHA, GQA and MQA at matched total parameters", v, claims,
                          columns=("decode_ms",), matched_to="mla", reference="mha"))


def _rope() -> Suite:
    def width(r: int) -> dict[str, Any]:
        return {"n_routed_experts": 0, "qk_rope_head_dim": r, "qk_nope_head_dim": 96 - r}

    v = tuple(Variant(f"rope{r}", f"d_h^R {r} (d_h {96 - r})", width(r)) for r in (8, 16, 32, 64))
    claims = tuple(Claim(f"a decoupled RoPE of width {r} costs no quality against V2's ratio (32 of 96)",
                         "the article's open question; V2 Sec. 2.1.3", f"rope{r}", "rope32", "not_higher")
                   for r in (8, 16, 64))
    return _matched(Suite("rope", "The width of the decoupled RoPE key at a fixed head width", v, claims,
                          matched_to="rope32", reference="rope32"))


_UNGROUPED = {"n_group": 1, "topk_group": 1, "topk_method": "greedy"}
NO_DROP = {"capacity_factor": None}


def _moe() -> Suite:
    def moe(routed: int, width: int, shared: int, k: int) -> dict[str, Any]:
        return {**_UNGROUPED, "n_routed_experts": routed, "moe_intermediate_size": width, "n_shared_experts": shared,
                "num_experts_per_tok": k}

    v = (
        Variant("deepseekmoe", "DeepSeekMoE: 2 shared + top-4 of 16 (width 64)", moe(16, 64, 2, 4), NO_DROP),
        Variant("gshard", "GShard-style: top-2 of 6 (width 192), no shared", moe(6, 192, 0, 2), NO_DROP),
        Variant("dense", "dense FFN (width 384)", {"n_routed_experts": 0}, NO_DROP),
        Variant("no_shared", "no shared experts: top-6 of 18 (width 64)", moe(18, 64, 0, 6), NO_DROP),
        Variant("coarse", "coarser: 1 shared + top-2 of 8 (width 128)", moe(8, 128, 1, 2), NO_DROP),
    )
    claims = (
        Claim("DeepSeekMoE beats GShard at the same total and activated parameters", "DeepSeekMoE Sec. 4.2",
              "deepseekmoe", "gshard", "lower"),
        Claim("an MoE beats the dense model of the same activated parameters", "DeepSeekMoE Sec. 4.2",
              "deepseekmoe", "dense", "lower"),
        Claim("shared experts help: without them (and with more routed experts activated) the loss rises",
              "DeepSeekMoE Sec. 4.4", "deepseekmoe", "no_shared", "lower"),
        Claim("finer expert segmentation helps: coarser experts raise the loss", "DeepSeekMoE Sec. 4.4",
              "deepseekmoe", "coarse", "lower"),
    )
    return Suite("moe", "DeepSeekMoE vs GShard vs dense at the same activated parameters", v, claims)


def routed_config(topk_group: int) -> dict[str, Any]:
    """32 routed experts (width 48) on 8 device groups, top-4 inside topk_group of them, plus 4 shared experts:
    activated FFN width 4 x 48 + 4 x 48 = 384, as the moe suite's."""
    return {"n_routed_experts": 32, "moe_intermediate_size": 48, "n_shared_experts": 4, "num_experts_per_tok": 4,
            "n_group": 8, "topk_group": topk_group, "topk_method": "group_limited_greedy"}


def _routing() -> Suite:
    v = tuple(Variant(f"m{m}", f"M = {m}" + (" (unrestricted top-K)" if m == 8 else ""), routed_config(m), NO_DROP)
              for m in (1, 2, 3, 4, 8))
    claims = (
        Claim("device-limited routing with M = 3 performs about like unrestricted top-K", "V2 Sec. 2.2.2",
              "m3", "m8", "not_higher"),
        Claim("M = 4 performs about like unrestricted top-K", "V2 Sec. 2.2.2", "m4", "m8", "not_higher"),
        Claim("M = 3 cuts the cross-device traffic of unrestricted top-K", "V2 Sec. 2.2.2", "m3", "m8", "lower",
              metric="off_device_copies"),
    )
    return Suite("routing", "Device-limited routing: D = 8 groups, M of them per token", v, claims,
                 columns=("off_device_copies", "devices_per_token"), reference="m8")


def _balance() -> Suite:
    off = {"device_balance_alpha": 0.0, "comm_balance_alpha": 0.0}
    v = (
        Variant("recipe", "V2 recipe: all balance losses, token dropping", routed_config(3)),
        Variant("no_device_losses", "no device/comm losses, token dropping", {**routed_config(3), **off}),
        Variant("no_dropping", "all balance losses, no dropping", routed_config(3), NO_DROP),
        Variant("neither", "no device/comm losses, no dropping", {**routed_config(3), **off}, NO_DROP),
    )
    claims = (
        Claim("the device-level loss balances the load across devices", "V2 Sec. 2.2.3", "recipe",
              "no_device_losses", "lower", metric="device_load"),
        Claim("balanced devices drop fewer tokens at capacity factor 1.0", "V2 Sec. 2.2.3-2.2.4", "recipe",
              "no_device_losses", "lower", metric="dropped"),
        Claim("the device- and communication-level losses cost no quality", "V2 Sec. 2.2.3", "no_dropping",
              "neither", "not_higher"),
        Claim("token dropping in training costs no quality", "V2 Sec. 2.2.4", "recipe", "no_dropping",
              "not_higher"),
    )
    return Suite("balance", "The balance losses and device-level token dropping", v, claims,
                 columns=("expert_load", "device_load", "dropped"))


def _upcycle() -> Suite:
    dense = {"n_routed_experts": 0, "intermediate_size": 128}
    moe = {**_UNGROUPED, "intermediate_size": 128, "n_routed_experts": 16, "moe_intermediate_size": 64,
           "n_shared_experts": 2, "num_experts_per_tok": 4}
    v = (
        Variant("dense_base", "dense (FFN width 128), the first stage", dense, NO_DROP),
        Variant("upcycled", "upcycled MoE: 2 shared (= the dense FFN) + top-4 of 16", moe, NO_DROP,
                start=("upcycle", "dense_base")),
        Variant("random_moe", "the same MoE, randomly initialised", moe, NO_DROP),
        Variant("dense_continued", "the dense model trained on", dense, NO_DROP, start=("continue", "dense_base")),
    )
    claims = (
        Claim("an upcycled MoE beats a randomly initialised one at equal steps", "the article; training/upcycle.py",
              "upcycled", "random_moe", "lower"),
        Claim("an upcycled MoE beats the dense model trained for the same further steps",
              "the article; training/upcycle.py", "upcycled", "dense_continued", "lower"),
    )
    return Suite("upcycle", "Upcycling a dense model to DeepSeekMoE", v, claims, reference="random_moe")


SUITES: dict[str, Suite] = {s.name: s for s in (_attention(), _rope(), _moe(), _routing(), _balance(), _upcycle())}
