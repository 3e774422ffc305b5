"""The engine: requests in, tokens out, a step at a time, over a paged latent cache.

    engine = Engine.from_pretrained(path, cache_memory="4GiB", max_num_seqs=64)
    engine.generate(["def f(", "import"], SamplingParams(max_tokens=32))        # offline: a list of prompts
    engine.add_request("r1", "def f(", params); engine.step(); engine.abort("r1")  # what a server drives
    admission = engine.admit(prompt, params)      # check once (any thread), then add_request("r2", admission)

Admission (admit) is the one place a request is checked: tokenized, its ids and parameters against the model, its
length against max_model_len and its worst case against the cache; a RequestError names the field at fault.
A step schedules sequences (scheduler.py), packs their new tokens into one flat batch with their positions and
slot mapping (paged.StepBatch), runs the model once, and samples the next token of every sequence whose tokens
are all computed (sampler.py), each by its request's parameters. The engine owns the cache; the model only sees
the step's batch through the attention-cache seam (dsv2/model/cache.py). One lock guards the engine's state, so a
server's threads may add and abort requests while another thread steps.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ...checkpoint import from_pretrained
from ...cpu import optimize
from ...cpu.decode_step import DecodeStep
from ...errors import AdapterError, GenerationError, RequestError
from ...lora import read_adapter
from ...model import DeepseekV2
from ...tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids
from . import prompt_logprobs
from .adapters import Adapters
from .blocks import ROOT_HASH, BlockPool
from .detokenizer import Detokenizer
from .options import CONTEXT_EXCEEDED, DEFAULT_CACHE_BYTES, check_options, device_memory, parse_bytes
from .paged import PagedCache, Segment, StepBatch
from .params import Admission, CompletionOutput, RequestOutput, SamplingParams, choice_seed, prompt_token_ids
from .sampler import Row, sample
from .scheduler import Scheduler
from .sequence import Request, Sequence, Status
from .stop_strings import StopStrings


@dataclass
class Packed:
    """One step's flat batch (Engine.pack): token ids, a Segment per sequence, the rows to sample at and their
    sequences."""

    ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    sample_at: list[int] = field(default_factory=list)
    ready: list[Sequence] = field(default_factory=list)
    prompt_spans: list[prompt_logprobs.Span] = field(default_factory=list)
    """The prompt tokens whose log-probabilities their requests asked for."""
    slots: list[int] = field(default_factory=list)
    """Each token's LoRA adapter slot (-1: the base model)."""


class Engine:
    def __init__(self, model: DeepseekV2, tokenizer=None, *, cache_memory: str | int | None = None,
                 num_blocks: int | None = None, block_size: int | None = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True, dtype: torch.dtype | None = None,
                 max_model_len: int | None = None, max_loras: int = 0, max_lora_rank: int = 16):
        """cache_memory (bytes, or "4GiB") or num_blocks size the paged cache (default: 1 GiB, or what
        max_num_seqs full contexts take if less); block_size tokens per block (default 64, or max_model_len if
        less); max_num_seqs sequences and max_num_batched_tokens tokens per step at most; dtype of the cache
        (default: the model's); max_model_len prompt and output tokens per sequence at most (default: the model's
        context); max_loras LoRA adapters loaded at once (add_adapter), of rank max_lora_rank at most."""
        config = model.config
        self.max_model_len, block_size = check_options(
            config, cache_memory=cache_memory, num_blocks=num_blocks, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
        self.model = optimize(model.eval())  # the engine owns its model: eval mode, the CPU paths for prefill
        self.fused = DecodeStep(self.model)  # decode-only steps: a few C++ calls per layer
        self.adapters = Adapters(self.model, max_loras, max_lora_rank) if max_loras else None
        self.tokenizer = tokenizer
        w = model.model.embed_tokens.weight
        self.device, dtype = w.device, dtype or w.dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise GenerationError(f"the cache dtype must be float32, bfloat16 or float16, got {dtype}")
        per_token = PagedCache.bytes_per_token(model, dtype)
        if num_blocks is None:
            budget = (parse_bytes(cache_memory) if cache_memory is not None else
                      min(DEFAULT_CACHE_BYTES, max_num_seqs * self.max_model_len * per_token))
            num_blocks = budget // (per_token * block_size)
            if num_blocks < 1:
                raise GenerationError(f"cache_memory {cache_memory} holds no block of {block_size} tokens "
                                      f"({per_token * block_size} bytes)")
        size, room = num_blocks * block_size * per_token, device_memory(self.device)
        if size > room:  # before the allocation: a clear error, not the allocator's traceback
            where = "this machine" if self.device.type == "cpu" else str(self.device)
            raise GenerationError(f"the cache ({size / 2**30:.1f} GiB: cache_memory or num_blocks) is more than "
                                  f"the {room / 2**30:.1f} GiB of memory {where} has")
        self.cache = PagedCache(model, num_blocks, block_size, dtype, self.device)
        self.pool = BlockPool(num_blocks, prefix_caching)
        self.scheduler = Scheduler(self.pool, self.cache, max_num_seqs, max_num_batched_tokens)
        self.eos_ids = set(config.eos_token_ids)
        self.bos_id = config.bos_token_id
        if tokenizer is not None:
            bos, eos = special_token_ids(tokenizer, bos_id=config.bos_token_id)
            self.bos_id = bos
            if eos is not None:
                self.eos_ids.add(eos)
        self._requests: dict[str, Request] = {}
        self._arrivals = itertools.count()
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, quantize=None, **kw) -> Engine:
        """A checkpoint directory (its tokenizer.json too, if there is one); quantize as dsv2.from_pretrained;
        keywords as Engine()."""
        tok = Path(path) / TOKENIZER_FILE
        model = from_pretrained(path, dtype=dtype, device=device, quantize=quantize)
        return cls(model, load_tokenizer(tok) if tok.exists() else None, **kw)

    # -- the stepping API -----------------------------------------------------------------------------------------
    def admit(self, prompt: str | Seq[int], params: SamplingParams | None = None, *, truncate: bool = True,
              adapter: str | None = None) -> Admission:
        """Check a request completely, once: the prompt (a text is tokenized, BOS first; ids must be in the
        vocabulary), what its parameters need (stop strings a tokenizer, stop tokens the vocabulary), its length
        against max_model_len and its worst case against the cache, the LoRA adapter it names (loaded by
        add_adapter). max_tokens=None becomes what the context and
        the cache leave; a max_tokens past the context is cut to it (truncate, as generate does) or refused. The
        RequestError names the field at fault. It reads no state a step changes, so any thread may call it."""
        params = params or SamplingParams()
        self._check_adapter(adapter)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings are matched on the text: the engine needs a tokenizer (or use "
                               "stop_token_ids)", "stop")
        vocab = self.model.config.vocab_size
        ids = prompt_token_ids(self.encode(prompt) if isinstance(prompt, str) else prompt, vocab)
        for name, token_ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            bad = [t for t in token_ids if t >= vocab]
            if bad:
                raise RequestError(f"{name} outside the vocabulary [0, {vocab}): {bad[:5]}", name)
        return Admission(ids, replace(params, **self._length(len(ids), params, truncate)), StopStrings(params.stop),
                         adapter)

    def _length(self, prompt_len: int, params: SamplingParams, truncate: bool) -> dict[str, int]:
        """max_tokens (and min_tokens) resolved against the context and the cache. The worst case in blocks: the
        prompt's full blocks, shared, and for each of the n completions its own copy of the prompt's partial last
        block (copy-on-write) plus the blocks its new tokens fill."""
        limit, bs, blocks = self.max_model_len, self.cache.block_size, self.pool.num_blocks
        room = limit - prompt_len
        if room < 1:
            raise RequestError(f"the prompt has {prompt_len} tokens; the model's context is {limit}, with no room "
                               "for a new token", "prompt", CONTEXT_EXCEEDED)
        shared, partial = divmod(prompt_len, bs)
        asked = params.max_tokens
        if asked is None:  # as many as every completion's blocks leave
            asked = (blocks - shared) // params.n * bs - partial
            if asked < 1:
                raise RequestError(f"the prompt ({prompt_len} tokens) and n={params.n} completions leave no room in "
                                   f"the cache ({blocks} blocks of {bs} tokens): give the engine more cache_memory",
                                   "prompt")
        elif asked > room and not truncate:
            raise RequestError(f"the model's context is {limit} tokens; this request has {prompt_len} prompt "
                               f"tokens and asks for {asked} more", "max_tokens", CONTEXT_EXCEEDED)
        max_new = min(asked, room)
        need = shared + params.n * -(-(partial + max_new) // bs)
        if need > blocks:
            raise RequestError(f"the request needs up to {need} cache blocks of {bs} tokens, the cache has "
                               f"{blocks}: give the engine more cache_memory, or ask for fewer tokens", "max_tokens")
        return {"max_tokens": max_new, "min_tokens": min(params.min_tokens, max_new)}

    def add_request(self, request_id: str, prompt: str | Seq[int] | Admission,
                    params: SamplingParams | None = None) -> None:
        """Queue a request: an Admission (checked already), or a text prompt (needs the tokenizer; BOS is
        prepended) or token ids with their params, which are admitted first."""
        adm = prompt if isinstance(prompt, Admission) else self.admit(prompt, params)
        with self._lock:
            if request_id in self._requests:
                raise RequestError(f"request {request_id!r} is already running")
            self._check_adapter(adm.adapter)  # it may have been unloaded since admission
            req = Request(request_id, adm.prompt_ids, adm.params, next(self._arrivals), stops=adm.stops,
                          adapter=adm.adapter)
            if adm.params.prompt_logprobs is not None:
                req.prompt_logprobs = [None] * len(adm.prompt_ids)
            req.seqs.append(self._sequence(req, 0, list(adm.prompt_ids)))
            self._requests[request_id] = req
            self.scheduler.add(req.seqs[0])

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is not running."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return False
            for seq in req.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq)
                    seq.finish_reason = "abort"
            return True

    # -- LoRA adapters (adapters.py) ------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT-format adapter folder under `name` (requests name it with admit(..., adapter=name))."""
        if self.adapters is None:
            raise AdapterError("this engine serves no LoRA adapters: create it with max_loras >= 1")
        adapter = read_adapter(path)  # the files read before the lock: a step never waits for a disk
        with self._lock:
            self.adapters.add(name, adapter, path)

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter (AdapterError while a request still uses it)."""
        with self._lock:
            if self.adapters is None or name not in self.adapters.loaded:
                raise AdapterError(f"no LoRA adapter named {name!r} is loaded")
            busy = sum(r.adapter == name for r in self._requests.values())
            if busy:
                raise AdapterError(f"the adapter {name!r} is in use by {busy} running request(s)")
            self.adapters.remove(name)

    def _check_adapter(self, name: str | None) -> None:
        if name is not None and (self.adapters is None or name not in self.adapters.loaded):
            raise RequestError(f"no LoRA adapter named {name!r} is loaded", "model", "model_not_found")

    def _slot(self, seq: Sequence) -> int:
        name = seq.request.adapter
        return -1 if name is None else self.adapters.loaded[name].slot

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """One step: schedule -> pack -> forward -> sample -> append -> outputs. The outputs of the requests that
        moved (finished ones for the last time)."""
        with self._lock:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                if self.scheduler.waiting or self.scheduler.running:  # admit checked that each fits the cache
                    raise RuntimeError("the scheduler found nothing it could run: an engine bug, please report it")
                return []
            batch = self.pack(scheduled)
            logits = self.forward(batch)
            for seq, n in scheduled:
                self.scheduler.computed(seq, n)
            owners, rows = self._sampled(batch.ready)
            tokens, logprobs = sample(logits[rows], [self._row(s) for s in owners])
            for seq, token, lp in zip(owners, tokens, logprobs, strict=True):
                self._append(seq, token, lp)
            moved = {seq.request.request_id: seq.request for seq in owners}
            return [self._output(req) for req in moved.values()]

    def pack(self, scheduled: list[tuple[Sequence, int]]) -> Packed:
        """The scheduled sequences' new tokens as one flat batch: each a Segment of it, and the rows to sample at
        (the last token of each sequence whose tokens are then all computed). A part of step, under its lock."""
        packed = Packed()
        for seq, n in scheduled:
            packed.segments.append(Segment(len(packed.ids), n, seq.num_computed, list(seq.blocks)))
            if prompt_logprobs.wanted(seq):
                packed.prompt_spans.append((seq, len(packed.ids), seq.num_computed, n))
            packed.ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
            packed.slots.extend([self._slot(seq)] * n)
            if seq.num_computed + n == seq.num_tokens:
                packed.sample_at.append(len(packed.ids) - 1)
                packed.ready.append(seq)
        return packed

    def forward(self, batch: Packed) -> torch.Tensor:
        """The model over the flat batch, through the paged cache: logits [len(batch.sample_at), V]. A part of
        step, under its lock."""
        with torch.inference_mode():
            ids = torch.tensor([batch.ids], device=self.device)
            step = StepBatch(self.cache, batch.segments, self.device)
            n = len(batch.ids)
            adapted = self.adapters is not None and self.adapters.set_rows(batch.slots, self.device)
            if step.decode_only and self.fused.applies(n) and batch.sample_at == list(range(n)) and not adapted:
                return self.fused(ids, step.positions(1, n, self.device), step)
            if batch.prompt_spans:  # the final norm's output, the LM head applied here: prompt_logprobs.py
                hidden_ND = self.model(ids, cache=step, hidden=True)[0]
                prompt_logprobs.fill(self.model.lm_head, hidden_ND, batch.prompt_spans)
                return self.model.lm_head(hidden_ND[batch.sample_at])
            return self.model(ids, cache=step,
                              logits_at=torch.tensor(batch.sample_at, dtype=torch.long, device=self.device))

    def _sampled(self, ready: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """The sequences to sample for and the logits row of each: a prompt's n completions start from its row."""
        owners, rows = [], []
        for j, seq in enumerate(ready):
            for s in self._forked(seq):
                owners.append(s)
                rows.append(j)
        return owners, rows

    # -- the offline API ------------------------------------------------------------------------------------------
    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress: bool = True) -> list[RequestOutput]:
        """Every prompt to the end, batched continuously; the final output of each, in the prompts' order."""
        params_list = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        names = [f"generate-{next(self._arrivals)}-{i}" for i in range(len(prompts))]
        for name, prompt, p in zip(names, prompts, params_list, strict=True):
            self.add_request(name, prompt, p)
        final: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not progress) as bar:
            while len(final) < len(names):
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
        return [final[n] for n in names]

    @property
    def stats(self) -> dict[str, int]:
        """Sequences running and waiting (and max_num_seqs, how many may run), prefix-cache queries and hits (in
        blocks), preemptions, free and total blocks, tokens per block, cache bytes per token, max_model_len."""
        with self._lock:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "max_num_seqs": self.scheduler.max_num_seqs,
                    "prefix_queries": self.pool.queries, "prefix_hits": self.pool.hits,
                    "preemptions": self.scheduler.preemptions, "free_blocks": self.pool.num_free,
                    "prompt_logprobs_uncached": self.scheduler.prompt_logprobs_uncached,
                    "num_blocks": self.pool.num_blocks, "block_size": self.cache.block_size,
                    "bytes_per_token": PagedCache.bytes_per_token(self.model, self.cache.storage.dtype),
                    "max_model_len": self.max_model_len}

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """A text prompt's token ids as the engine takes it: BOS (where the model has one), then the text's."""
        if self.tokenizer is None:
            raise RequestError("a text prompt needs a tokenizer; pass token ids", "prompt")
        ids = self.tokenizer.encode_batch([text])[0].ids  # as encode(text), but it lets go of the GIL meanwhile
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    # ------------------------------------------------------------------------------------------------------------
    def _sequence(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        p = req.params
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(choice_seed(p.seed, index))
        detok = Detokenizer(self.tokenizer, req.stops) if self.tokenizer is not None else None
        root = ROOT_HASH if req.adapter is None else self.adapters.loaded[req.adapter].root
        return Sequence(req, index, token_ids, gen, detok, root=root)

    def _forked(self, seq: Sequence) -> list[Sequence]:
        req = seq.request
        if seq.index != 0 or seq.output_ids or len(req.seqs) == req.params.n:
            return [seq]
        for i in range(1, req.params.n):
            child = self._sequence(req, i, [])
            self.scheduler.fork(seq, child)
            req.seqs.append(child)
        return req.seqs

    def _row(self, seq: Sequence) -> Row:
        p = seq.request.params
        banned = []
        if len(seq.output_ids) < p.min_tokens:  # no EOS or stop token before min_tokens
            banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids))
        return Row(p, seq.request.prompt_ids, seq.output_ids, seq.generator, banned)

    def _append(self, seq: Sequence, token: int, lp) -> None:
        p = seq.request.params
        seq.token_ids.append(token)
        seq.new_ids.append(token)
        if lp is not None:
            seq.new_logprobs.append(lp)
            seq.logprobs.append(lp)
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._finish(seq, "stop")
            return
        if seq.detokenizer is not None:
            seq.new_text += seq.detokenizer.push(token)
            if seq.detokenizer.stopped:
                self._finish(seq, "stop")
                return
        if len(seq.output_ids) >= seq.request.params.max_tokens:  # admission cut it to the context
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.detokenizer is not None:
            seq.new_text += seq.detokenizer.finish()
        seq.finish_reason = reason
        self.scheduler.finish(seq)

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            lp = req.params.logprobs is not None
            outs.append(CompletionOutput(seq.index, seq.output_ids, seq.text, seq.new_ids, seq.new_text,
                                         list(seq.logprobs) if lp else None, seq.new_logprobs if lp else None,
                                         seq.finish_reason))
            seq.new_ids, seq.new_text, seq.new_logprobs = [], "", []
        finished = req.finished
        if finished:
            self._requests.pop(req.request_id, None)
        return RequestOutput(req.request_id, req.prompt_ids, outs, finished, req.seqs[0].num_cached,
                             req.prompt_logprobs)
