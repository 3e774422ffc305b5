"""The `dsv2` LoRA commands and flags: merge-lora, and the adapter flags of train, generate and serve."""

from __future__ import annotations

import argparse


def add_train_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--lora", action="store_true", default=None, help="fine-tune low-rank adapters on --init-from's "
                   "frozen weights (checkpoints hold the adapters only, in PEFT's format)")
    s.add_argument("--lora-r", type=int, help="adapter rank (default 16)")
    s.add_argument("--lora-alpha", type=float, help="the adapters' scale is alpha / r (default 2 r)")
    s.add_argument("--lora-targets", help="groups (attention, dense, shared, experts, all-linear) or module names, "
                   "comma-separated (default attention)")
    s.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0.05)")


def train_settings(args: argparse.Namespace) -> dict:
    return {"lora": args.lora, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "lora_targets": args.lora_targets, "lora_dropout": args.lora_dropout}


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR", help="LoRA adapter folders (PEFT format) to "
                   "serve beside the base model; a request's model field picks one")
    s.add_argument("--max-loras", type=int, help="adapters loaded at once (default: the --lora-modules given, at "
                   "least 1)")
    s.add_argument("--max-lora-rank", type=int, help="the largest adapter rank (default: the largest given, or 16)")
    s.add_argument("--enable-lora-loading", action="store_true", help="POST /v1/load_lora_adapter and "
                   "/v1/unload_lora_adapter without --api-key (they always work with one): any client may then "
                   "name a folder of this machine")


def parse_modules(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=DIR, got {item!r}")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        out[name] = path
    return out


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import from_pretrained, save_pretrained
    from ..checkpoint.io import copy_tokenizer_of
    from ..errors import CheckpointError
    from ..lora import merged
    from ..tokenizer import TOKENIZER_FILE

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: give a new folder")
    model = merged(from_pretrained(args.base, dtype=None), args.adapter)
    save_pretrained(model, out)
    tok = Path(args.base) / TOKENIZER_FILE
    if tok.exists():
        copy_tokenizer_of(tok, out, model.config)
    print(f"wrote {out}: {args.base} with {args.adapter} merged into its weights")
    return 0


def add_merge_parser(sub) -> None:
    s = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base checkpoint: a plain checkpoint")
    s.add_argument("base", help="the base checkpoint directory")
    s.add_argument("adapter", help="the adapter folder (PEFT format: adapter_config.json, adapter_model.safetensors)")
    s.add_argument("out", help="the merged checkpoint's directory (new)")
    s.set_defaults(func=cmd_merge_lora)
