"""The `dsv2` commands that transform or inspect files: quantize, export, eval, upcycle, plot, routing-sim."""

from __future__ import annotations

import argparse
import json
import sys


def recipe(args: argparse.Namespace, method: str | None = None):
    """--quantize/--method, --group-size and --lm-head as a dsv2.quant Recipe (None: no quantization)."""
    method = method or getattr(args, "quantize", None)
    if method is None:
        if getattr(args, "group_size", None) is not None:
            raise ValueError("--group-size applies with --quantize")
        return None
    from ..quant.recipe import Recipe

    return Recipe.build(method, args.group_size, lm_head=getattr(args, "lm_head", False))


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..checkpoint.quantize import quantize_checkpoint

    quant = recipe(args, args.method)
    stats = quantize_checkpoint(args.input, args.output, quant, progress=not args.quiet)
    print(f"dsv2 quantize: {args.output}: {stats['quantized']} weights quantized ({quant.describe()}), "
          f"{stats['bytes_in'] / 2**20:,.1f} MiB -> {stats['bytes_out'] / 2**20:,.1f} MiB", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import CheckpointError
    from ..training.sharded import export, is_sharded

    src, out = Path(args.checkpoint), Path(args.out)
    if not is_sharded(src):
        raise CheckpointError(f"{src} is not a sharded checkpoint (a --fsdp run's RUN_DIR/checkpoints/step_N): other "
                              "checkpoints are in the Hugging Face layout already")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: give a new folder")
    total = export(src, out)
    print(f"wrote {out}: {total / 2**20:.1f} MiB in the Hugging Face layout")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from ..tools.plot import plot_run

    paths = plot_run(args.run_dir)
    if not paths:
        raise ValueError(f"nothing to plot in {args.run_dir}: its metrics.jsonl has no step with a loss")
    for path in paths:
        print(path)
    return 0


def cmd_routing_sim(args: argparse.Namespace) -> int:
    from ..tools.routing_sim import run

    _, table, paths = run(args.out, checkpoint=args.checkpoint, n_experts=args.experts, n_devices=args.devices,
                          top_k=args.top_k, n_tokens=args.tokens, logit_std=args.logit_std, seed=args.seed,
                          data=args.data)
    print(table)
    for path in paths.values():
        print(path)
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from ..presets import get_config
    from ..training.upcycle import upcycle_checkpoint

    model = upcycle_checkpoint(args.dense_dir, get_config(args.config), args.out_dir, seed=args.seed,
                               routed_scale=args.routed_scale)
    print(f"upcycled MoE checkpoint ({model.num_parameters() / 1e6:.1f}M parameters) written to {args.out_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import from_pretrained
    from ..eval import perplexity, token_stream
    from ..tokenizer import load_tokenizer, special_token_ids

    if (args.data is None) == (args.tasks is None):
        raise ValueError("give --data (perplexity on text) or --tasks (lm-evaluation-harness tasks)")
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tokenizer = load_tokenizer(args.model)  # before the weights: a checkpoint without one fails at once
    if args.tasks is not None:
        return _eval_tasks(args, tokenizer, dtype)
    model = from_pretrained(args.model, dtype=dtype, quantize=recipe(args))
    _, eos = special_token_ids(tokenizer, eos_id=model.config.eos_token_ids[0] if model.config.eos_token_ids else None)
    ids, nbytes = token_stream(tokenizer, args.data, eos, args.max_bytes)
    r = perplexity(model, ids, nbytes, args.seq_len, args.stride, progress=not args.quiet)
    if args.json:
        print(json.dumps({"model": str(args.model), **r.to_dict()}))
    else:
        print(f"perplexity {r.perplexity:.4f}, {r.bits_per_byte:.4f} bits per byte: {r.tokens:,} tokens scored "
              f"({r.bytes:,} bytes of text) in {r.windows:,} windows of {r.seq_len} every {r.stride}, "
              f"{r.tokens_per_s:,.0f} tokens/s")
    return 0


def _eval_tasks(args: argparse.Namespace, tokenizer, dtype) -> int:
    """lm-evaluation-harness's tasks in-process (dsv2.eval.LMEvalModel on the engine)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import make_table
    except ImportError:
        raise ValueError("--tasks needs lm-evaluation-harness: pip install 'dsv2[eval]'") from None
    from ..eval import LMEvalModel
    from ..inference.engine import Engine

    engine = Engine.from_pretrained(args.model, dtype=dtype, quantize=recipe(args))
    manager = TaskManager(include_path=args.include_path) if args.include_path else TaskManager()
    tasks = [t for t in args.tasks.split(",") if t]
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(missing)} (local task folders: --include-path DIR)")
    out = lm_eval.simple_evaluate(model=LMEvalModel(engine, args.seq_len, progress=not args.quiet), tasks=tasks,
                                  task_manager=manager, limit=args.limit)
    print(json.dumps({"model": str(args.model), "results": out["results"]}, default=str) if args.json
          else make_table(out))
    return 0
