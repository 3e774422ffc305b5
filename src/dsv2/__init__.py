"""dsv2: DeepSeek-V2 (MLA + DeepSeekMoE + device-limited routing) in PyTorch: train, fine-tune, scale out, serve."""

from .reproducibility import request_reproducible_gemms

request_reproducible_gemms()  # before torch's first GEMM: MKL reads its mode once (reproducibility.py)

# ruff: noqa: E402 - the imports below come after that call on purpose

from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import ConfigError, ModelConfig
from .inference.generate import GenerationError, generate, stream_generate
from .model import DeepseekV2
from .presets import PRESETS, get_config

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "DeepseekV2", "GenerationError", "ModelConfig",
           "from_pretrained", "generate", "get_config", "save_pretrained", "stream_generate"]
__version__ = "0.1.0"
