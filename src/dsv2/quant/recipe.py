"""Which weights are quantized, and how: a scheme per module family, and its compressed-tensors config.

Families (the parts of DeepSeek-V2 a sensitivity study separates, benchmarks/quant_accuracy.py):

    q        q_proj, or q_a_proj and q_b_proj (MLA's query compression)
    kv_a     kv_a_proj_with_mqa (the joint KV compression c_KV and the decoupled key k_R)
    kv_b     kv_b_proj (W_UK and W_UV: absorbed at decode)
    o        o_proj
    experts  the routed experts (per expert gate/up/down_proj)
    shared   the shared experts
    dense    the dense layers' MLP
    lm_head  the output projection: kept in the model's dtype unless asked for (it is read at every token, but its
             errors land directly on the logits)

Never quantized: the embeddings, the norms and the router gate (mlp.gate): small, and the router's choices must not
flip. config.json records the recipe as compressed-tensors' `quantization_config` (quant_method
"compressed-tensors", format "pack-quantized", symmetric int weights, strategy "group" or "channel"), so a
checkpoint dsv2 quantizes says how by itself and loads without a flag, here and in the tools that read that format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CheckpointError, ConfigError
from .formats import Scheme

FAMILIES = ("q", "kv_a", "kv_b", "o", "experts", "shared", "dense", "lm_head")
_ATTENTION = {"q_proj": "q", "q_a_proj": "q", "q_b_proj": "q", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
              "o_proj": "o"}
_PATTERNS = {
    "q": r"re:.*self_attn\.(q_proj|q_a_proj|q_b_proj)$",
    "kv_a": r"re:.*self_attn\.kv_a_proj_with_mqa$",
    "kv_b": r"re:.*self_attn\.kv_b_proj$",
    "o": r"re:.*self_attn\.o_proj$",
    "experts": r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$",
    "shared": r"re:.*mlp\.shared_experts\.(gate_proj|up_proj|down_proj)$",
    "dense": r"re:.*mlp\.(gate_proj|up_proj|down_proj)$",
    "lm_head": "lm_head",
}
INT4_MIX = {"dense": "int8", "kv_a": "int8"}
"""`--quantize int4` keeps these families at int8: int4 on them alone costs most of int4's KL divergence while they
hold ~1% of V2-Lite's weights (the sensitivity table of benchmarks/quant_accuracy.py)."""
QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"


def family(name: str) -> str | None:
    """The family of a linear's official name (without .weight), or None (kept in float)."""
    if name == "lm_head":
        return "lm_head"
    last = name.rsplit(".", 1)[-1]
    if ".self_attn." in name:
        return _ATTENTION.get(last)
    if last not in ("gate_proj", "up_proj", "down_proj"):
        return None
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared"
    return "dense" if name.endswith(f".mlp.{last}") else None


@dataclass(frozen=True)
class Recipe:
    """family -> Scheme; a family not listed stays in the model's dtype."""

    schemes: dict[str, Scheme] = field(default_factory=dict)

    @staticmethod
    def build(method: str, group_size: int | None = None, lm_head: bool = False,
              families: dict[str, str] | None = None) -> Recipe:
        """`method` for every family but lm_head (with it if lm_head); `families` overrides some: family -> method
        ("int8", "int4", or "none" to keep it in float). None: the default mix (INT4_MIX for int4); {}: none."""
        base = Scheme.parse(method, group_size)
        schemes = {f: base for f in FAMILIES if f != "lm_head" or lm_head}
        if families is None:
            families = INT4_MIX if method == "int4" else {}
        for fam, m in families.items():
            if fam not in FAMILIES:
                raise ConfigError(f"unknown module family {fam!r}; choose from {', '.join(FAMILIES)}")
            if m == "none":
                schemes.pop(fam, None)
            else:
                schemes[fam] = Scheme.parse(m, group_size if m == method else None)
        return Recipe(schemes)

    def scheme_for(self, name: str) -> Scheme | None:
        fam = family(name)
        return None if fam is None else self.schemes.get(fam)

    def describe(self) -> str:
        parts = {}
        for fam, s in self.schemes.items():
            parts.setdefault(f"{s.method}/{'channel' if s.group == 0 else f'g{s.group}'}", []).append(fam)
        return "; ".join(f"{k}: {', '.join(v)}" for k, v in parts.items()) or "nothing"

    # -----------------------------------------------------------------------------------------------------------
    # compressed-tensors' quantization_config
    def to_config(self) -> dict:
        by_scheme: dict[Scheme, list[str]] = {}
        for fam in FAMILIES:
            if fam in self.schemes:
                by_scheme.setdefault(self.schemes[fam], []).append(fam)
        groups = {}
        for i, (s, fams) in enumerate(by_scheme.items()):
            groups[f"group_{i}"] = {
                "targets": [_PATTERNS[f] for f in fams],
                "weights": {"num_bits": s.bits, "type": "int", "symmetric": True,
                            "strategy": "channel" if s.group == 0 else "group",
                            "group_size": None if s.group == 0 else s.group, "dynamic": False,
                            "actorder": None, "observer": "minmax", "block_structure": None},
                "input_activations": None, "output_activations": None, "format": FORMAT,
            }
        ignore = ["re:.*mlp\\.gate$"] + ([] if "lm_head" in self.schemes else ["lm_head"])
        return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
                "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}

    @staticmethod
    def from_config(qc: dict, where: str = "config.json") -> Recipe:
        """The recipe of a compressed-tensors quantization_config (pack-quantized symmetric int weights)."""
        if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise CheckpointError(f"{where}: quantization_config method {method!r} is not supported (dsv2 reads "
                                  f"{QUANT_METHOD!r}, format {FORMAT!r})")
        groups = qc.get("config_groups") or {}
        ignore = qc.get("ignore") or []
        schemes: dict[str, Scheme] = {}
        for gname, g in groups.items():
            w = g.get("weights") or {}
            fmt = g.get("format") or qc.get("format")
            ok = (fmt == FORMAT and w.get("type") == "int" and w.get("symmetric", True) and w.get("num_bits") in (4, 8)
                  and w.get("strategy") in ("group", "channel") and not g.get("input_activations")
                  and (w.get("strategy") == "channel" or isinstance(w.get("group_size"), int)))
            if not ok:
                raise CheckpointError(f"{where}: quantization group {gname!r} is not symmetric int4/int8 weight-only "
                                      f"{FORMAT} (dsv2 reads that subset of compressed-tensors)")
            scheme = Scheme(w["num_bits"], 0 if w["strategy"] == "channel" else int(w["group_size"]))
            for target in g.get("targets") or []:
                for fam in FAMILIES:
                    if _matches(target, fam) and not any(_matches(i, fam) for i in ignore):
                        if target.startswith("re:") or fam not in schemes:  # names over class (as compressed-tensors)
                            schemes[fam] = scheme
        return Recipe(schemes)


_EXAMPLES = {"q": "model.layers.1.self_attn.q_proj", "kv_a": "model.layers.1.self_attn.kv_a_proj_with_mqa",
             "kv_b": "model.layers.1.self_attn.kv_b_proj", "o": "model.layers.1.self_attn.o_proj",
             "experts": "model.layers.1.mlp.experts.0.gate_proj",
             "shared": "model.layers.1.mlp.shared_experts.gate_proj", "dense": "model.layers.0.mlp.gate_proj",
             "lm_head": "lm_head"}


def _matches(target: str, fam: str) -> bool:
    """Whether a compressed-tensors target (a class name, `re:` regex or module name) covers a family's modules."""
    name = _EXAMPLES[fam]
    if target == "Linear":
        return True
    if target.startswith("re:"):
        alts = [name, name.replace("q_proj", "q_b_proj"), name.replace("q_proj", "q_a_proj")] if fam == "q" else [name]
        return any(re.match(target[3:], n) for n in alts)
    return target == name

