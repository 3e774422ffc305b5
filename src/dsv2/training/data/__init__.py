"""A run's data: corpus readers (readers.py), the tokenizer (tokenizer.py), token files and batches
(token_files.py)."""

from .instructions import IGNORE_INDEX, InstructionDataset, Renderer, is_instruction_data
from .readers import (
                      FOLDER_SUFFIXES,
                      STDLIB_SOURCE,
                      DataError,
                      default_corpus_sources,
                      iter_documents,
                      resolve_sources,
                      sources_fingerprint,
)
from .token_files import TokenDataset, build_token_dataset, token_dtype, unigram_entropy
from .tokenizer import (
                      BOS_NAMES,
                      DEFAULT_SPECIAL_TOKENS,
                      EOS_NAMES,
                      TOKENIZER_FILE,
                      load_tokenizer,
                      save_tokenizer,
                      special_token_ids,
                      train_tokenizer,
)

__all__ = ["BOS_NAMES", "DEFAULT_SPECIAL_TOKENS", "EOS_NAMES", "FOLDER_SUFFIXES", "IGNORE_INDEX", "STDLIB_SOURCE",
           "TOKENIZER_FILE", "DataError", "InstructionDataset", "Renderer", "TokenDataset", "build_token_dataset",
           "default_corpus_sources", "is_instruction_data", "iter_documents", "load_tokenizer", "resolve_sources",
           "save_tokenizer", "sources_fingerprint", "special_token_ids", "token_dtype", "train_tokenizer",
           "unigram_entropy"]
