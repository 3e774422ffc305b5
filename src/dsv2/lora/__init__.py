"""LoRA fine-tuning and serving: adapters on MLA's projections, the dense MLP, the shared and the routed experts.

layers.py   the adapted modules (slots of stacked A/B pairs; the experts' inside their grouped GEMMs)
attach.py   target selection, wrapping, merging
peft.py     PEFT's adapter folder (adapter_config.json + adapter_model.safetensors)
adapters.py adapters in and out of a model's slots; load_adapter
"""

from .adapters import adapter_of, check_modules, load_adapter, merged, put_adapter, save_adapter
from .attach import (
                     DEFAULT_TARGETS,
                     GROUPS,
                     adapted,
                     add_lora,
                     lora_parameters,
                     merge_lora,
                     parse_targets,
                     rows_of,
                     targeted,
                     wrap,
)
from .layers import LoRAExperts, LoRALinear, Rows
from .peft import Adapter, read_adapter, write_adapter

__all__ = ["DEFAULT_TARGETS", "GROUPS", "Adapter", "LoRAExperts", "LoRALinear", "Rows", "adapted", "adapter_of",
           "add_lora", "check_modules", "load_adapter", "lora_parameters", "merge_lora", "merged", "parse_targets",
           "put_adapter", "read_adapter", "rows_of", "save_adapter", "targeted", "wrap", "write_adapter"]
