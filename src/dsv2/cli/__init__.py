"""The `dsv2` command: info, generate, serve, quantize, eval, train, merge-lora, plot, upcycle, routing-sim, ablate
(the commands that transform or inspect files are in transforms.py, LoRA's flags and merge-lora in lora.py)."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings
from pathlib import Path

from . import lora as lora_cli
from .generate import _torch_dtype, cmd_generate


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be in [0, 2**63), got {value}")
    return value


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids must be comma-separated integers, got {text!r}") from None


def cmd_info(args: argparse.Namespace) -> int:
    from ..presets import get_config
    from ..tools.info import describe, format_info

    config = get_config(args.config)
    if args.context is None:
        args.context = min(4096, config.max_position_embeddings)
    d = describe(config, context_len=args.context)
    if args.parallel is not None:  # training memory per rank of a layout (tools/parallel_memory.py)
        from ..tools.parallel_memory import format_memory, memory_per_rank

        d["parallel"] = memory_per_rank(config, args.parallel, expert_parallel=args.expert_parallel or 1,
                                        fsdp=args.fsdp, dp_replicate=args.dp_replicate or 1,
                                        cpu_offload=args.cpu_offload)
    print(json.dumps(d, indent=2) if args.json else format_info(d) + (
        "\n" + format_memory(d["parallel"]) if args.parallel is not None else ""))
    if args.context > config.max_position_embeddings:
        print(f"note: --context {args.context} is beyond the model's context ({config.max_position_embeddings} "
              "tokens, max_position_embeddings)", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve.server import serve
    from .transforms import recipe

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty: give a key, or leave the flag out to serve without one")
    return serve(args.model, host=args.host, port=args.port, served_model_name=args.served_model_name,
                 api_key=args.api_key or os.environ.get("DSV2_API_KEY") or None, max_model_len=args.max_model_len,
                 max_queue=args.max_queue, grace=args.grace, log_level=args.log_level, dtype=_torch_dtype(args.dtype),
                 max_num_seqs=args.max_num_seqs,
                 cache_memory=args.cache_memory, num_blocks=args.num_blocks, block_size=args.block_size,
                 max_num_batched_tokens=args.max_num_batched_tokens, prefix_caching=not args.no_prefix_caching,
                 quantize=recipe(args), lora_modules=lora_cli.parse_modules(args.lora_modules),
                 max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                 enable_lora_loading=args.enable_lora_loading)


def _parse_set(items: list[str] | None) -> dict[str, object] | None:
    """--set FIELD=VALUE: VALUE as JSON (numbers, true/false/null, lists, objects), else as a string."""
    out: dict[str, object] = {}
    for kv in items or []:
        field, sep, value = kv.partition("=")
        if not sep or not field:
            raise ValueError(f"--set expects FIELD=VALUE, got {kv!r}")
        try:
            out[field] = json.loads(value)
        except ValueError:
            out[field] = value
    return out or None


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig, TrainingError, resumed_config, train_settings
    from ..training.run_dir import RunDir
    from ..training.trainer import train

    if args.resume and args.overwrite:
        raise TrainingError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                            "--overwrite replaces it")
    if args.preset and args.init_from:
        raise TrainingError("--preset and --init-from both choose the model; --init-from brings its own config")
    if args.sample_tokens < 0:
        raise TrainingError(f"--sample-tokens must be >= 0, got {args.sample_tokens}")

    given = train_settings(
        args.config, preset=args.preset, data=args.data, out=args.out, max_steps=args.max_steps,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, save_every=args.save_every, eval_every=args.eval_every,
        init_from=args.init_from, tokenizer=args.tokenizer, dtype=args.dtype, seed=args.seed,
        max_bytes=args.max_bytes, schedule=args.schedule, capacity_factor=args.capacity_factor,
        expert_parallel=args.expert_parallel, device=args.device, model=_parse_set(args.set),
        deterministic=args.deterministic or None, **lora_cli.train_settings(args), fsdp=args.fsdp or None,
        dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, cpu_offload=args.cpu_offload or None,
        activation_checkpointing=args.activation_checkpointing or None,
    )
    if args.resume:  # the run's own settings, with only those that may change on resume taken from the flags
        out = given.get("out", TrainConfig.out)
        stored = RunDir(out).stored_settings()
        tc = resumed_config(stored, given, out)
    else:
        tc = TrainConfig.from_dict(given)
    summary = train(tc, resume=args.resume, overwrite=args.overwrite)
    if summary.get("rank", 0) != 0:  # under torchrun, rank 0 reports
        return 0
    resume_cmd = f"dsv2 train --out {tc.out} --resume"
    if summary.get("finished_already"):
        print(f"{tc.out} is already finished (step {summary['steps']} of max_steps {tc.max_steps}); to train it "
              f"further: {resume_cmd} --max-steps N (N > {summary['steps']})")
        return 0
    if summary.get("interrupted"):
        print(f"\n{summary['interrupted']}: stopped at step {summary['steps']} of {tc.max_steps}; checkpoint: "
              f"{summary['checkpoint']}\nresume with: {resume_cmd}", file=sys.stderr)
        return 130
    val, ent = summary["val_loss"], summary["unigram_entropy"]
    print(f"\nvalidation loss {val:.3f} nats/token; unigram entropy of the validation split {ent:.3f} "
          f"nats/token ({'below' if val < ent else 'NOT below'} it by {ent - val:.3f})")
    if summary.get("base_val_loss") is not None:
        print(f"before fine-tuning ({tc.init_from}): validation loss {summary['base_val_loss']:.3f} nats/token")
    print(f"checkpoint: {summary['checkpoint']}" + (" (the adapters, in PEFT's format)" if tc.lora else ""))
    if args.sample_tokens and summary["checkpoint"] and (Path(summary["checkpoint"]) / "dcp").is_dir():
        print(f"(a sharded checkpoint: no sample; `dsv2 export {summary['checkpoint']} OUT` writes it as a Hugging "
              "Face checkpoint)")
    elif args.sample_tokens and summary["checkpoint"]:
        print("\nsample from the checkpoint:")
        model, lora = (tc.init_from, summary["checkpoint"]) if tc.lora else (summary["checkpoint"], None)
        sample = argparse.Namespace(model=model, lora=lora, prompt=args.sample_prompt, ids=None, no_bos=False,
                                    max_new_tokens=args.sample_tokens, temperature=0.8, top_k=50, top_p=0.95,
                                    seed=0, dtype="fp32")
        cmd_generate(sample)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    import dataclasses

    from ..experiments import SUITES, run_suite
    from ..experiments.runner import Interrupted
    from ..experiments.suites import DEFAULT_BUDGET, FLAG_FIELDS, QUICK_BUDGET

    flags = {k: getattr(args, k) for k in FLAG_FIELDS if getattr(args, k) is not None}
    budget = dataclasses.replace(QUICK_BUDGET if args.quick else DEFAULT_BUDGET, **flags)
    out = args.out or ("runs/ablate-quick" if args.quick else "runs/ablate")
    try:
        for name in list(SUITES) if args.suite == "all" else [args.suite]:
            paths = run_suite(name, out, quick=args.quick, seeds=args.seeds, budget=budget, data=args.data,
                              device=args.device)
            print(paths["report"].read_text(encoding="utf-8"))
            print("\n".join(str(p) for p in paths.values()) + "\n")
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"\n{e or 'interrupted'}; the same command resumes", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .transforms import cmd_eval, cmd_export, cmd_plot, cmd_quantize, cmd_routing_sim, cmd_upcycle

    p = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in PyTorch: train, fine-tune, serve.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="parameters, activated parameters, KV cache and FLOPs of a config")
    s.add_argument("config", help="preset name (deepseek-v2, deepseek-v2-lite, tiny, small) or config.json path")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--context", type=int, help="context length for attention FLOPs and cache size (default: 4096, "
                   "or the model's context if shorter)")
    s.add_argument("--parallel", type=int, metavar="WORLD", help="training memory per rank on WORLD ranks")
    s.add_argument("--expert-parallel", type=int, help="with --parallel: ranks the routed experts are sharded over")
    s.add_argument("--fsdp", action="store_true", help="with --parallel: FSDP2 shards over the ranks")
    s.add_argument("--dp-replicate", type=int, help="with --parallel --fsdp: replica groups (HSDP)")
    s.add_argument("--cpu-offload", action="store_true", help="with --parallel --fsdp: state in host memory")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("generate", help="stream tokens from a checkpoint directory")
    s.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs tokenizer.json in the checkpoint)")
    src.add_argument("--ids", type=_parse_ids, help="comma-separated token ids")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=_seed)
    s.add_argument("--no-bos", action="store_true", help="do not prepend BOS to a text prompt")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = as stored")
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights while loading (a quantized "
                   "checkpoint needs no flag: dsv2 quantize)")
    s.add_argument("--group-size", type=int, help="columns per scale (default: int8 per output channel, int4 32)")
    s.add_argument("--lora", metavar="DIR", help="apply a LoRA adapter folder (PEFT format) to the model")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    s.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout, with tokenizer.json "
                   "for text and tokenizer_config.json's chat_template for chat)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 exposes the model to the network: set --api-key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="the model's name in the API (default: the folder's name)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1, /tokenize, /detokenize "
                   "(or set DSV2_API_KEY)")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = as stored")
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights while loading (a quantized "
                   "checkpoint needs no flag: dsv2 quantize)")
    s.add_argument("--group-size", type=int, help="columns per scale (default: int8 per output channel, int4 32)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoding together at most")
    s.add_argument("--cache-memory", help="paged cache size, e.g. 4GiB (default: 1 GiB, or what max-num-seqs full "
                   "contexts take if less)")
    s.add_argument("--num-blocks", type=int, help="paged cache size in blocks (instead of --cache-memory)")
    s.add_argument("--block-size", type=int, help="tokens per cache block (default 64, or --max-model-len if less)")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (chunked prefill)")
    s.add_argument("--no-prefix-caching", action="store_true")
    s.add_argument("--max-model-len", type=int, help="prompt + completion tokens at most (default: the model's "
                   "context)")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting at most; beyond it 503")
    s.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM lets requests in flight finish")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    lora_cli.add_serve_flags(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("quantize", help="write an int8/int4 weight-only quantized checkpoint (compressed-tensors "
                       "format), a tensor at a time")
    s.add_argument("input", help="float checkpoint directory (Hugging Face layout)")
    s.add_argument("output", help="folder for the quantized checkpoint")
    s.add_argument("--method", choices=["int8", "int4"], required=True)
    s.add_argument("--group-size", type=int, help="columns per scale (default: int8 per output channel, int4 32)")
    s.add_argument("--lm-head", action="store_true", help="quantize lm_head too (default: kept in float)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity and bits per byte on text (sliding windows), or lm-eval tasks")
    s.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    s.add_argument("--data", nargs="+", help="perplexity on text: files, folders, globs, .jsonl, .parquet, 'stdlib'")
    s.add_argument("--tasks", help="lm-evaluation-harness tasks, comma-separated (needs pip install 'dsv2[eval]')")
    s.add_argument("--include-path", help="a folder of lm-eval task YAML files (local tasks)")
    s.add_argument("--limit", type=int, help="with --tasks: at most this many documents per task")
    s.add_argument("--seq-len", type=int, help="window length (default: the model's context; with --tasks: the "
                   "tokens a request may hold)")
    s.add_argument("--stride", type=int, help="new tokens scored per window after the first (default seq-len / 2)")
    s.add_argument("--max-bytes", type=int, help="use at most this many bytes of text")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto = as stored")
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights while loading")
    s.add_argument("--group-size", type=int, help="columns per scale with --quantize")
    s.add_argument("--json", action="store_true", help="one JSON line (for scripts)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("train", help="train or fine-tune (no flags: the tiny preset on the built-in corpus)")
    s.add_argument("--config", help="YAML or TOML file of training settings (flags override it)")
    s.add_argument("--preset", help="model preset or config.json (default tiny)")
    s.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a model config field")
    s.add_argument("--data", nargs="+", help="corpus: files, folders, globs, .jsonl, .parquet, or 'stdlib'")
    s.add_argument("--max-bytes", type=int, help="use at most this many bytes of corpus text")
    s.add_argument("--tokenizer", help="existing tokenizer.json (default: train a byte-level BPE)")
    s.add_argument("--out", help="run directory (default runs/tiny)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--batch-size", type=int, help="global batch in sequences")
    s.add_argument("--micro-batch-size", type=int, help="sequences per forward (gradient accumulation)")
    s.add_argument("--seq-len", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--schedule", choices=["step", "cosine"])
    s.add_argument("--capacity-factor", type=float, help="device-level token dropping capacity")
    s.add_argument("--save-every", type=int)
    s.add_argument("--eval-every", type=int)
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, "
                   "with its own settings (only max-steps, save/eval intervals, device and expert-parallel may change)")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --out (removes its "
                   "checkpoints, metrics, tokenizer and token files)")
    s.add_argument("--init-from", help="fine-tune from a checkpoint directory (Hugging Face layout)")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    s.add_argument("--device")
    s.add_argument("--seed", type=_seed)
    s.add_argument("--expert-parallel", type=int, help="shard routed experts over this many ranks (torchrun)")
    s.add_argument("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the ranks "
                   "(FSDP2; torchrun)")
    s.add_argument("--dp-replicate", type=int, help="with --fsdp: replicate over this many groups of ranks (HSDP)")
    s.add_argument("--dp-shard", type=int, help="with --fsdp: ranks per group that shard each weight (default: all "
                   "of them, or world / --dp-replicate); checked against the number of processes")
    s.add_argument("--cpu-offload", action="store_true", help="with --fsdp: shards, gradients and optimizer state "
                   "in host memory, the optimizer step on the CPU (for GPUs short of memory)")
    s.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer's attention and "
                   "experts in the backward (less memory, more compute)")
    s.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms: CUDA runs "
                   "repeat bitwise (CPU runs do without it)")
    s.add_argument("--sample-tokens", type=int, default=80, help="tokens to sample from the final checkpoint")
    s.add_argument("--sample-prompt", default="def ", help="prompt for the final sample")
    lora_cli.add_train_flags(s)
    s.set_defaults(func=cmd_train)
    lora_cli.add_merge_parser(sub)

    s = sub.add_parser("export", help="a sharded (--fsdp) training checkpoint as a Hugging Face checkpoint")
    s.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N of a --fsdp run")
    s.add_argument("out", help="the new checkpoint's directory")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("plot", help="PNG plots of a run's metrics")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("upcycle", help="initialise an MoE checkpoint from a dense one")
    s.add_argument("dense_dir")
    s.add_argument("--config", required=True, help="MoE preset or config.json")
    s.add_argument("out_dir")
    s.add_argument("--routed-scale", type=float, default=0.0,
                   help="scale of the routed experts' down projections (0: the MoE computes the dense function)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the balanced gate initialisation")
    s.set_defaults(func=cmd_upcycle)

    s = sub.add_parser("routing-sim", help="devices per token and all-to-all traffic of device-limited routing, "
                                           "M = 1..devices")
    s.add_argument("--checkpoint", help="use this checkpoint's trained router on text (default: a random router)")
    s.add_argument("--data", nargs="+", help="text for --checkpoint (default: the built-in corpus)")
    s.add_argument("--experts", type=int, default=160, help="routed experts of the random router (V2: 160)")
    s.add_argument("--devices", type=int, help="devices = device groups D (default: 8, V2; or the checkpoint's "
                   "n_group)")
    s.add_argument("--top-k", type=int, help="experts per token (default: 6, V2; or the checkpoint's)")
    s.add_argument("--tokens", type=int, default=8192, help="tokens to route")
    s.add_argument("--logit-std", type=float, default=1.0, help="std of the random router's gate logits")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--out", default="routing_sim", help="folder for routing_sim.md, .json and .png")
    s.set_defaults(func=cmd_routing_sim)

    s = sub.add_parser("ablate", help="reproduce the paper's design choices at small scale: train the variants of a "
                       "suite, then a report with verdicts")
    s.add_argument("suite", choices=["attention", "rope", "moe", "routing", "balance", "upcycle", "all"])
    s.add_argument("--quick", action="store_true", help="a few steps per run: every code path in minutes")
    s.add_argument("--seeds", type=int, default=2, help="seeds per variant (default 2; verdicts need >= 2)")
    s.add_argument("--out", help="folder of the runs and reports (default runs/ablate, --quick runs/ablate-quick); "
                   "the same command resumes")
    s.add_argument("--steps", type=int, help="steps per run (default 150, --quick 10)")
    s.add_argument("--batch-size", type=int, help="sequences per step (default 16, --quick 8)")
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default 256, --quick 128)")
    s.add_argument("--max-bytes", type=int, help="corpus text used (default 6,000,000; --quick 1,000,000)")
    s.add_argument("--data", nargs="+", help="corpus (default: the built-in one)")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_ablate)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..distributed.parallel import RankError
    from ..errors import CheckpointError, ConfigError, GenerationError
    from ..training.config import TrainingError

    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_a, **_k: f"warning: {message}\n"  # one line, no source excerpt
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, GenerationError, TrainingError, RankError, ValueError,
            FileNotFoundError) as e:
        return _error(args, str(e))
    except OSError as e:  # a full disk, a read-only folder, a path that is a file: one line, no traceback
        if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename:
            return _error(args, f"{e.filename} (or a folder above it) is a file, not a folder")
        where = f": {e.filename}" if e.filename else ""
        return _error(args, f"{e.strerror or e}{where}")
    except MemoryError as e:
        return _error(args, f"out of memory ({e or 'allocation failed'}); use smaller settings")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _error(args: argparse.Namespace, message: str) -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 speaks for all (RankError carries the others')
        print(f"dsv2 {args.command}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    return 2


if __name__ == "__main__":
    sys.exit(main())
