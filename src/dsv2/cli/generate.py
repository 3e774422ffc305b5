"""`dsv2 generate`: stream tokens from a checkpoint (with a LoRA adapter applied, --lora)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _torch_dtype(name: str):
    """--dtype auto|fp32|bf16 as from_pretrained takes it (None: as stored)."""
    import torch

    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[name]


def cmd_generate(args: argparse.Namespace) -> int:
    from ..checkpoint import from_pretrained
    from ..errors import GenerationError
    from ..inference.generate import check_prompts, check_sampling, generate
    from .transforms import recipe

    check_sampling(args.temperature, args.top_k, args.top_p)  # before the model loads
    dtype = _torch_dtype(args.dtype)
    model = from_pretrained(args.model, dtype=dtype, quantize=recipe(args))
    if getattr(args, "lora", None):
        from ..lora import load_adapter

        load_adapter(model, args.lora)
    from ..tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids

    tok_path = Path(args.model) / TOKENIZER_FILE
    tokenizer = None
    if tok_path.exists():

        tokenizer = load_tokenizer(tok_path)
    if args.prompt is not None:
        if tokenizer is None:
            raise GenerationError(f"{args.model} has no tokenizer.json; pass token ids with --ids")
        bos, _ = special_token_ids(tokenizer, bos_id=model.config.bos_token_id)
        prompt = ([bos] if bos is not None and not args.no_bos else []) + tokenizer.encode(args.prompt).ids
    else:
        prompt = args.ids
    check_prompts(model, [prompt], args.max_new_tokens)  # before anything is printed

    produced: list[int] = []
    if tokenizer is not None:
        printed = 0
        print(args.prompt if args.prompt is not None else tokenizer.decode(prompt), end="", flush=True)

        def emit(_: int, token: int) -> None:  # decode the whole suffix: byte-level BPE tokens split characters
            nonlocal printed
            produced.append(token)
            text = tokenizer.decode(produced)
            if not text.endswith("\ufffd"):
                print(text[printed:], end="", flush=True)
                printed = len(text)
    else:
        def emit(_: int, token: int) -> None:
            produced.append(token)
            print(token, end=" ", flush=True)

    generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, callback=emit)
    print()
    context = model.config.max_position_embeddings
    ended = bool(produced) and produced[-1] in model.config.eos_token_ids
    if len(produced) < args.max_new_tokens and not ended and len(prompt) + len(produced) >= context:
        print(f"(stopped after {len(produced)} of {args.max_new_tokens} new tokens: the model's context is "
              f"{context} tokens)", file=sys.stderr)
    return 0
