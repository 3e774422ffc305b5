"""Adapter folders in PEFT's format, which PEFT, vLLM and transformers read:

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, base_model_name_or_path, ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r]

<module> is the official tensor name without `.weight`; the routed experts are per expert, 2-D, as the checkpoints
hold them (`mlp.experts.{j}.gate_proj`, ...). Inside dsv2 they are stacked (layers.py); this module maps the names,
as checkpoint/hf_names.py does for the weights. Adapters others trained with PEFT for this architecture read the
same way (rank_pattern / alpha_pattern and rsLoRA's scale included); what dsv2 cannot apply (DoRA, biases,
modules_to_save, pickled files) is refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AdapterError
from ..files import atomic_write, write_safetensors
from .attach import MLP_NAMES

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


@dataclass
class Adapter:
    """A LoRA adapter as PEFT stores it: per module (official name, experts per expert), A [r, in] and B [out, r],
    and the scale alpha / r (or alpha / sqrt(r), rsLoRA) each module's output is multiplied by."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.pairs.values())

    def modules(self) -> list[str]:
        """The dsv2 modules it adapts (the routed experts once per layer)."""
        return sorted({m.group(1) if (m := _EXPERT.match(k)) else k for k in self.pairs})


def _config_value(cfg: dict[str, Any], pattern_key: str, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first key whose pattern ends the module name."""
    for key, value in (cfg.get(pattern_key) or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_pattern(pattern, key: str, kind, where: Path) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise AdapterError(f"{where}: {key} must map module-name patterns to values")
    for k, v in pattern.items():
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            raise AdapterError(f"{where}: {key}[{k!r}] must be a positive {'integer' if kind is int else 'number'}")
        try:
            re.compile(k)
        except re.error as e:
            raise AdapterError(f"{where}: {key} key {k!r} is not a regular expression ({e})") from None


def read_adapter(path: str | Path) -> Adapter:
    """An adapter folder, checked: AdapterError (one line) for anything dsv2 cannot apply exactly."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter folder")
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}" + (
            f" ({', '.join(pickled)} is pickled, which dsv2 never loads: save it with safetensors)" if pickled else ""))
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path} has no {CONFIG_FILE}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterError(f"{cfg_file} is not readable JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}; "
                           "dsv2 applies LORA adapters")
    for key, ok, what in (("use_dora", lambda v: not v, "DoRA"), ("bias", lambda v: v in (None, "none"), "biases"),
                          ("modules_to_save", lambda v: not v, "modules_to_save (full copies of modules)"),
                          ("fan_in_fan_out", lambda v: not v, "fan_in_fan_out (Conv1D layouts)")):
        if not ok(cfg.get(key)):
            raise AdapterError(f"{cfg_file}: {key}={cfg[key]!r}; dsv2 does not apply {what}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float))):
        raise AdapterError(f"{cfg_file}: r must be a positive integer and lora_alpha a number")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        _check_pattern(cfg.get(key), key, kind, cfg_file)
    if cfg.get("target_parameters"):
        raise AdapterError(f"{cfg_file}: target_parameters (adapters on fused parameters) is not read by dsv2: its "
                           "routed experts take per-expert pairs (experts.{j}.gate_proj, ...)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: {e}") from None
    return Adapter(*_pairs(tensors, cfg, weights), config=cfg)


def _pairs(tensors: dict[str, torch.Tensor], cfg: dict[str, Any], where: Path):
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: tensor {key} is not a LoRA A/B weight of a module (base_model.model.<module>"
                               ".lora_A.weight / .lora_B.weight)")
        halves.setdefault(m.group(1), {})[m.group(2)] = t
    if not halves:
        raise AdapterError(f"{where} holds no adapter weights")
    pairs, scales = {}, {}
    for module, h in sorted(halves.items()):
        if set(h) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{where}: {module} has {', '.join(h)} but not {({'lora_A', 'lora_B'} - set(h)).pop()}")
        A, B = h["lora_A"], h["lora_B"]
        r = _config_value(cfg, "rank_pattern", module, cfg["r"])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] != r:
            raise AdapterError(f"{where}: {module} has A {tuple(A.shape)} and B {tuple(B.shape)}; the config's rank "
                               f"for it is {r} (A [r, in], B [out, r])")
        alpha = _config_value(cfg, "alpha_pattern", module, cfg["lora_alpha"])
        pairs[module] = (A, B)
        scales[module] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return pairs, scales


def write_adapter(path: str | Path, adapter: Adapter) -> None:
    """The folder PEFT writes (into an existing or new folder; each file written whole, then renamed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (A, B) in adapter.pairs.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
    write_safetensors(path / WEIGHTS_FILE, tensors)
    atomic_write(path / CONFIG_FILE, json.dumps(adapter.config, indent=2))


def peft_config(r: int, alpha: float, dropout: float, modules: list[str], base: str | None) -> dict[str, Any]:
    """adapter_config.json for a dsv2 adapter. target_modules lists the adapted module names as PEFT and vLLM match
    them (the routed experts as gate_proj / up_proj / down_proj); the tensors say exactly which modules have an
    adapter."""
    names = {p for m in modules for p in (MLP_NAMES if m.endswith(".experts") else (m.rsplit(".", 1)[-1],))}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
            "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(names), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
            "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "revision": None}
