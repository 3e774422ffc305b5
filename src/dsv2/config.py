"""Model configuration: one dataclass carrying every field of the official DeepSeek-V2 config.json.

Field names are the official ones, so a checkpoint's config.json maps onto `ModelConfig` one to one. Both the
original form (``rope_theta`` + ``rope_scaling`` with ``"type": "yarn"``) and the newer transformers form
(``rope_parameters``) are read; the original form is written. Keys this class does not know are kept in
``extra`` and written back unchanged.

A ``null`` in config.json (as transformers writes for fields it leaves unset, e.g. ``n_group`` and ``topk_group``
under greedy routing) means the field's default: :data:`NULL_MEANS` for the device-group fields (one group, no
device limit, which is what the official code does without groups), the dataclass default for the rest. Every
value is type-checked before any rule is applied, so a wrong type is a :class:`ConfigError` naming the field.

Paper symbols (DeepSeek-V2 report, Sec. 2) next to the field names:
    d      hidden_size              n_h    num_attention_heads       l   num_hidden_layers
    d_c    kv_lora_rank             d_c'   q_lora_rank               d_h qk_nope_head_dim (= v_head_dim in V2)
    d_h^R  qk_rope_head_dim         N_r    n_routed_experts          N_s n_shared_experts
    K_r    num_experts_per_tok      D      n_group (device groups)   M   topk_group
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .field_types import admits_none, check_field_types, default_value, field_types, is_int, is_number

TOPK_METHODS = ("greedy", "group_limited_greedy")
SCORING_FUNCS = ("softmax",)
HIDDEN_ACTS = ("silu", "gelu")
ATTENTION_TYPES = ("mla", "mha", "gqa", "mqa")
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
NULL_MEANS = {"n_group": 1, "topk_group": 1}
"""What a null means for fields whose dataclass default (V2's 8 groups, M = 3) would not fit a model without
device groups (greedy routing, as DeepSeek-V2-Lite's): one group, so the router is unrestricted."""
UNSUPPORTED_EXTRA = {"mlp_bias": False}
"""Official transformers fields dsv2 keeps in ``extra`` but implements only at this value."""


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------------------
    vocab_size: int = 102400
    """Number of token ids (rows of the embedding table and of the LM head)."""
    hidden_size: int = 5120
    """d: width of the residual stream."""
    intermediate_size: int = 12288
    """Hidden width of the dense SwiGLU FFN used in the non-MoE layers."""
    moe_intermediate_size: int = 1536
    """Hidden width of ONE fine-grained expert (routed or shared)."""
    num_hidden_layers: int = 60
    """l: number of decoder blocks."""
    num_attention_heads: int = 128
    """n_h: attention heads."""
    num_key_value_heads: int = 128
    """KV heads of the GQA baseline (ignored by MLA, which has a single shared latent)."""
    max_position_embeddings: int = 163840
    """Longest context the model is configured for (with YaRN: original context x factor)."""

    # --- MLA (Sec. 2.1) --------------------------------------------------------------------------------------
    q_lora_rank: int | None = 1536
    """d_c': query compression rank. None means no query compression (a single q_proj, as in V2-Lite)."""
    kv_lora_rank: int = 512
    """d_c: width of the joint KV latent c_KV, the only thing cached besides the RoPE key."""
    qk_nope_head_dim: int = 128
    """d_h: per-head width of the content (non-RoPE) part of queries and keys."""
    qk_rope_head_dim: int = 64
    """d_h^R: per-head width of the decoupled RoPE query; also the width of the one shared RoPE key."""
    v_head_dim: int = 128
    """Per-head value width."""
    attention_type: str = "mla"
    """dsv2 extension for the paper's Table 1 ablations: mla | mha | gqa | mqa (same head dims)."""
    attention_bias: bool = False
    """Official field; DeepSeek-V2 has no attention biases and dsv2 supports only False."""

    # --- DeepSeekMoE (Sec. 2.2) -------------------------------------------------------------------------------
    n_routed_experts: int | None = 160
    """N_r: routed experts per MoE layer. None or 0 makes every layer dense."""
    n_shared_experts: int | None = 2
    """N_s: always-on shared experts, run as one SwiGLU MLP of width N_s * moe_intermediate_size."""
    num_experts_per_tok: int = 6
    """K_r: routed experts chosen per token."""
    first_k_dense_replace: int = 1
    """The first k layers use the dense FFN instead of MoE."""
    moe_layer_freq: int = 1
    """Layer i >= first_k_dense_replace is MoE when i % moe_layer_freq == 0."""
    topk_method: str = "group_limited_greedy"
    """greedy: plain top-K. group_limited_greedy: V2's device-limited routing (Sec. 2.2.2)."""
    n_group: int = 8
    """D: number of device groups the routed experts are split into (contiguous blocks)."""
    topk_group: int = 3
    """M: at most this many device groups per token."""
    routed_scaling_factor: float = 16.0
    """Multiplies the routed experts' gate weights (when norm_topk_prob is False)."""
    norm_topk_prob: bool = False
    """Renormalise the K_r chosen gate weights to sum to one (instead of scaling them)."""
    scoring_func: str = "softmax"
    """Gate affinity function. V2 uses softmax (V3's sigmoid is a different model)."""

    # --- training-time balance (Sec. 2.2.3, 2.2.4); dsv2 fields ---------------------------------------------
    expert_balance_alpha: float = 0.003
    """a1: weight of the expert-level balance loss."""
    device_balance_alpha: float = 0.05
    """a2: weight of the device-level balance loss."""
    comm_balance_alpha: float = 0.02
    """a3: weight of the communication balance loss."""

    # --- norms, activations, embeddings ---------------------------------------------------------------------
    hidden_act: str = "silu"
    """Activation inside SwiGLU."""
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    """Std of the normal init of every weight matrix."""
    tie_word_embeddings: bool = False
    """Share the embedding table with the LM head (V2 does not)."""
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001

    # --- positions (RoPE / YaRN, Sec. 2.1.3 and Sec. 3.1.2) --------------------------------------------------
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        }
    )
    """None, or YaRN: {"type": "yarn", factor, original_max_position_embeddings, beta_fast, beta_slow,
    mscale, mscale_all_dim}."""

    extra: dict[str, Any] = field(default_factory=dict)
    """config.json keys dsv2 does not interpret; written back unchanged."""

    def __post_init__(self) -> None:
        hints = field_types(ModelConfig)
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and not admits_none(hints[f.name]):
                setattr(self, f.name, NULL_MEANS.get(f.name, default_value(f)))
        self.validate()

    # ----------------------------------------------------------------------------------------------------------
    # derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_routed(self) -> int:
        return self.n_routed_experts or 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def kv_heads(self) -> int:
        """KV heads of the attention actually used (MLA has one shared latent, reported as 1)."""
        return {"mla": 1, "mha": self.num_attention_heads, "gqa": self.num_key_value_heads, "mqa": 1}[
            self.attention_type
        ]

    def is_moe_layer(self, i: int) -> bool:
        """Paper/official rule: MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0."""
        return self.num_routed > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (the official code's rule)."""
        head_dim = self.qk_head_dim if self.attention_type == "mla" else self.qk_nope_head_dim
        scale = head_dim**-0.5
        if self.rope_scaling is not None:
            m_all = self.rope_scaling.get("mscale_all_dim", 0) or 0
            if m_all:
                m = yarn_get_mscale(self.rope_scaling["factor"], m_all)
                scale *= m * m
        return scale

    # ----------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(msg)

        check_field_types(self, ConfigError)
        for key, supported in UNSUPPORTED_EXTRA.items():
            if self.extra.get(key, supported) != supported:
                bad(f"{key}={self.extra[key]!r} is not supported (dsv2 implements DeepSeek-V2 with {key}={supported})")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                     "intermediate_size", "num_key_value_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad(f"q_lora_rank must be null (no query compression) or a positive integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.attention_type not in ATTENTION_TYPES:
            bad(f"attention_type must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.attention_type != "mla" and self.qk_rope_head_dim > self.qk_nope_head_dim:
            bad("the MHA/GQA/MQA baselines apply RoPE to the last qk_rope_head_dim dims of a qk_nope_head_dim "
                f"head, so qk_rope_head_dim ({self.qk_rope_head_dim}) must be <= qk_nope_head_dim "
                f"({self.qk_nope_head_dim})")
        if self.attention_type == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            bad(f"gqa needs num_attention_heads ({self.num_attention_heads}) divisible by num_key_value_heads "
                f"({self.num_key_value_heads})")
        if self.attention_bias:
            bad("attention_bias=true is not supported (DeepSeek-V2 has no attention biases)")
        if self.hidden_act not in HIDDEN_ACTS:
            bad(f"hidden_act must be one of {HIDDEN_ACTS}, got {self.hidden_act!r}")
        if not self.rms_norm_eps > 0:
            bad(f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            bad(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            bad(f"bos_token_id={self.bos_token_id} is outside the vocabulary [0, {self.vocab_size})")
        for v in self.eos_token_ids:
            if not 0 <= v < self.vocab_size:
                bad(f"eos_token_id={v} is outside the vocabulary [0, {self.vocab_size})")
        self._validate_rope_scaling()
        self._validate_moe()

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(f"rope_scaling type must be 'yarn' (the only scaling DeepSeek-V2 uses), got {kind!r}")
        missing = [k for k in ("factor", "original_max_position_embeddings") if rs.get(k) is None]
        if missing:
            raise ConfigError(f"rope_scaling (yarn) is missing {missing}")
        for key in YARN_KEYS:
            v = rs.get(key)
            if v is not None and not is_number(v):
                raise ConfigError(f"rope_scaling.{key} must be a finite number, got {v!r}")
        if not is_int(rs["original_max_position_embeddings"]):
            raise ConfigError("rope_scaling.original_max_position_embeddings must be an integer, got "
                              f"{rs['original_max_position_embeddings']!r}")
        if not rs["factor"] >= 1:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {rs['factor']}")
        if not rs["original_max_position_embeddings"] > 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be > 0")

    def _validate_moe(self) -> None:
        E = self.num_routed
        if self.n_routed_experts is not None and (not isinstance(E, int) or E < 0):
            raise ConfigError(f"n_routed_experts must be null or a non-negative integer, got {E!r}")
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.moe_layer_freq < 1:
            raise ConfigError(f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
        if self.topk_method not in TOPK_METHODS:
            hint = " (noaux_tc is DeepSeek-V3's router, not V2's)" if self.topk_method == "noaux_tc" else ""
            raise ConfigError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}{hint}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func must be 'softmax' for DeepSeek-V2, got {self.scoring_func!r}")
        if E == 0:
            return
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be a positive integer, got {self.moe_intermediate_size!r}")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if not 1 <= self.num_experts_per_tok <= E:
            raise ConfigError(f"num_experts_per_tok must be in [1, n_routed_experts={E}], "
                              f"got {self.num_experts_per_tok}")
        if self.n_group < 1 or E % self.n_group:
            raise ConfigError(f"n_routed_experts ({E}) must be divisible by n_group ({self.n_group}): experts are "
                              "split into n_group equal contiguous device groups")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
        if self.topk_method == "group_limited_greedy":
            available = self.topk_group * (E // self.n_group)
            if self.num_experts_per_tok > available:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts available in "
                    f"topk_group={self.topk_group} groups of {E // self.n_group} experts ({available})")
        for name in ("expert_balance_alpha", "device_balance_alpha", "comm_balance_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    # ----------------------------------------------------------------------------------------------------------
    # config.json round trip
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict (original or transformers-5 form). Unknown keys go to ``extra``."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object of fields, got {type(d).__name__}")
        d = copy.deepcopy(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in ("rope_parameters", "rope_scaling"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{key} must be an object or null, got {d[key]!r}")
        rp = d.pop("rope_parameters", None)
        if rp is not None:  # transformers >= 5: {"rope_type": ..., "rope_theta": ..., yarn keys}
            rp = dict(rp)
            d.setdefault("rope_theta", rp.pop("rope_theta", 10000.0))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            if kind == "default":
                d.setdefault("rope_scaling", None)
            else:
                d.setdefault("rope_scaling", {"type": kind, **{k: v for k, v in rp.items() if k in YARN_KEYS}})
        rs = d.get("rope_scaling")
        if rs is not None:
            rs = dict(rs)
            kind = rs.pop("rope_type", None) or rs.pop("type", None)
            if kind in (None, "default"):
                d["rope_scaling"] = None
            else:
                d["rope_scaling"] = {"type": kind, **rs}
        if "rope_scaling" not in d:
            d["rope_scaling"] = None  # an explicit config.json without rope_scaling means plain RoPE
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.pop("extra", None)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The original config.json form (rope_theta + rope_scaling), plus kept extra keys."""
        out: dict[str, Any] = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
        out.update({k: v for k, v in self.extra.items() if v is not None or k not in out})
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = {k: v for k, v in out["rope_scaling"].items() if v is not None}
        return out

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file (config.json must be UTF-8 JSON)") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except (OSError, RecursionError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / "config.json"
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        check_field_names(changes)
        return dataclasses.replace(self, **changes)


def check_field_names(fields: dict[str, Any]) -> None:
    """ConfigError naming each key of `fields` that is not a ModelConfig field (with the closest one)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        close = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        hints = "; ".join(f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items())
        raise ConfigError(f"unknown model config field {hints}")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
