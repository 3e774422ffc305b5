"""Checkpoints in the official Hugging Face layout: the name mapping on state dicts (hf_names.py) and the files
(io.py: from_pretrained, save_pretrained; safetensors only, nothing unpickled)."""

from .io import (
                 INDEX_FILE,
                 SINGLE_FILE,
                 CheckpointError,
                 checkpoint_files,
                 from_pretrained,
                 load_weights,
                 save_pretrained,
)

__all__ = ["INDEX_FILE", "SINGLE_FILE", "CheckpointError", "checkpoint_files", "from_pretrained", "load_weights",
           "save_pretrained"]
