"""dsv2: DeepSeek-V2 (MLA + DeepSeekMoE + device-limited routing) in PyTorch: train, fine-tune, scale out, serve.

The public API is loaded on first use (PEP 562), so `import dsv2.model` brings the model and its config only.
"""

from .reproducibility import request_reproducible_gemms

request_reproducible_gemms()  # before torch's first GEMM: MKL reads its mode once (reproducibility.py)

_API = {  # name -> the module that defines it
    "PRESETS": "presets", "get_config": "presets", "ConfigError": "errors", "ModelConfig": "config",
    "DeepseekV2": "model", "CheckpointError": "errors", "from_pretrained": "checkpoint",
    "save_pretrained": "checkpoint", "GenerationError": "errors", "RequestError": "errors",
    "generate": "inference.generate",
    "stream_generate": "inference.generate", "Engine": "inference.engine", "SamplingParams": "inference.engine",
    "RequestOutput": "inference.engine", "load_adapter": "lora", "merge_lora": "lora", "AdapterError": "errors",
}
_SUBPACKAGES = {"checkpoint", "cli", "config", "cpu", "distributed", "inference", "lora", "model", "presets", "quant",
                "tools", "training"}

__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'dsv2' has no attribute {name!r}")
