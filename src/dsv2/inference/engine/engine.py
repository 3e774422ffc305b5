"""The engine: requests in, tokens out, a step at a time, over a paged latent cache.

    engine = Engine.from_pretrained(path, cache_memory="4GiB", max_num_seqs=64)
    engine.generate(["def f(", "import"], SamplingParams(max_tokens=32))        # offline: a list of prompts
    engine.add_request("r1", "def f(", params); engine.step(); engine.abort("r1")  # what a server drives

A step schedules sequences (scheduler.py), packs their new tokens into one flat batch with their positions and
slot mapping (paged.StepBatch), runs the model once, and samples the next token of every sequence whose tokens
are all computed (sampler.py), each by its request's parameters. The engine owns the cache; the model only sees
the step's batch through the attention-cache seam (dsv2/model/cache.py). One lock guards the engine's state, so a
server's threads may add and abort requests while another thread steps.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from tqdm import tqdm

from ...checkpoint import from_pretrained
from ...cpu import optimize
from ...model import DeepseekV2
from ...tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids
from ..generate import GenerationError
from .blocks import BlockPool
from .detokenizer import Detokenizer
from .paged import PagedCache, Segment, StepBatch
from .params import CompletionOutput, RequestOutput, SamplingParams
from .sampler import Row, sample
from .scheduler import Scheduler
from .sequence import Request, Sequence, Status

DEFAULT_CACHE_BYTES = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_bytes(size: str | int) -> int:
    """4096, "512MiB", "4GiB", "1.5GB" -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise GenerationError(f"cache_memory {size!r} is not a size like 4GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Engine:
    def __init__(self, model: DeepseekV2, tokenizer=None, *, cache_memory: str | int | None = None,
                 num_blocks: int | None = None, block_size: int = 64, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True, dtype: torch.dtype | None = None):
        """cache_memory (bytes, or "4GiB") or num_blocks size the paged cache (default: 1 GiB, or what
        max_num_seqs full contexts take if less); block_size tokens per block; max_num_seqs sequences and
        max_num_batched_tokens tokens per step at most; dtype of the cache (default: the model's)."""
        self.model = optimize(model.eval())
        self.tokenizer = tokenizer
        w = model.model.embed_tokens.weight
        self.device, dtype = w.device, dtype or w.dtype
        config = model.config
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise GenerationError(f"the cache dtype must be float32, bfloat16 or float16, got {dtype}")
        if block_size < 1 or max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise GenerationError("block_size, max_num_seqs and max_num_batched_tokens must be >= 1")
        if num_blocks is None:
            per_token = PagedCache.bytes_per_token(model, dtype)
            budget = (parse_bytes(cache_memory) if cache_memory is not None else
                      min(DEFAULT_CACHE_BYTES, max_num_seqs * config.max_position_embeddings * per_token))
            num_blocks = budget // (per_token * block_size)
            if num_blocks < 1:
                raise GenerationError(f"cache_memory {cache_memory} holds no block of {block_size} tokens "
                                      f"({per_token * block_size} bytes)")
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
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None, **kw) -> Engine:
        """A checkpoint directory (its tokenizer.json too, if there is one); keywords as Engine()."""
        tok = Path(path) / TOKENIZER_FILE
        return cls(from_pretrained(path, dtype=dtype, device=device), load_tokenizer(tok) if tok.exists() else None,
                   **kw)

    # -- the stepping API -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None) -> None:
        """Queue a request: a text prompt (needs the tokenizer; BOS is prepended) or token ids."""
        params = params or SamplingParams()
        ids, max_new = self._checked(prompt, params)
        with self._lock:
            if request_id in self._requests:
                raise GenerationError(f"request {request_id!r} is already running")
            req = Request(request_id, ids, params, next(self._arrivals), max_new=max_new)
            req.seqs.append(self._sequence(req, 0, list(ids)))
            self._requests[request_id] = req
            self.scheduler.add(req.seqs[0])

    def check_request(self, prompt: str | Seq[int], params: SamplingParams | None = None) -> list[int]:
        """The prompt's token ids if add_request would take it, else the GenerationError it would raise (a server
        checks a request before it queues it; this reads no state a step changes)."""
        return self._checked(prompt, params or SamplingParams())[0]

    def _checked(self, prompt: str | Seq[int], params: SamplingParams) -> tuple[list[int], int]:
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings are matched on the text: the engine needs a tokenizer (or use "
                                  "stop_token_ids)")
        ids = self._prompt_ids(prompt)
        vocab = self.model.config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise GenerationError(f"stop_token_ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the model's context is {context}")
        max_new = min(params.max_tokens, context - len(ids))
        bs = self.cache.block_size
        need = -(-len(ids) // bs) + params.n * -(-max_new // bs)
        if need > self.pool.num_blocks:
            raise GenerationError(f"the request needs up to {need} cache blocks of {bs} tokens, the cache has "
                                  f"{self.pool.num_blocks}: give the engine more cache_memory, or ask for fewer "
                                  "tokens")
        return ids, max_new

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

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """One forward of every scheduled sequence's new tokens and a sample for each that is complete: the
        outputs of the requests that moved (finished ones for the last time)."""
        with self._lock:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                if self.scheduler.waiting or self.scheduler.running:  # add_request checked each fits the cache
                    raise RuntimeError("the scheduler found nothing it could run: an engine bug, please report it")
                return []
            segments, ids, sample_at, ready = [], [], [], []
            for seq, n in scheduled:
                segments.append(Segment(len(ids), n, seq.num_computed, list(seq.blocks)))
                ids.extend(seq.token_ids[seq.num_computed:seq.num_computed + n])
                if seq.num_computed + n == seq.num_tokens:
                    sample_at.append(len(ids) - 1)
                    ready.append(seq)
            with torch.inference_mode():
                logits = self.model(torch.tensor([ids], device=self.device),
                                    cache=StepBatch(self.cache, segments, self.device),
                                    logits_at=torch.tensor(sample_at, dtype=torch.long, device=self.device))
            for seq, n in scheduled:
                self.scheduler.computed(seq, n)
            owners, rows = [], []
            for j, seq in enumerate(ready):
                for s in self._forked(seq):  # the n completions of a prompt start from its logits
                    owners.append(s)
                    rows.append(j)
            tokens, logprobs = sample(logits[rows], [self._row(s) for s in owners])
            moved: dict[str, Request] = {}
            for seq, token, lp in zip(owners, tokens, logprobs, strict=True):
                self._append(seq, token, lp)
                moved[seq.request.request_id] = seq.request
            return [self._output(req) for req in moved.values()]

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
        """Sequences running and waiting, prefix-cache queries and hits (in blocks), preemptions, free and total
        blocks, cache bytes per token."""
        with self._lock:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "prefix_queries": self.pool.queries, "prefix_hits": self.pool.hits,
                    "preemptions": self.scheduler.preemptions, "free_blocks": self.pool.num_free,
                    "num_blocks": self.pool.num_blocks, "bytes_per_token": PagedCache.bytes_per_token(
                        self.model, self.cache.storage.dtype)}

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """A text prompt's token ids as the engine takes it: BOS (where the model has one), then the text's."""
        if self.tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer; pass token ids")
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self.tokenizer.encode(text).ids

    # ------------------------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Seq[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise GenerationError("the prompt is empty: generation needs at least one token (e.g. BOS)")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"the prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def _sequence(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        p = req.params
        gen = None
        if p.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed((p.seed + index) % 2**63)
        detok = Detokenizer(self.tokenizer, p.stop) if self.tokenizer is not None else None
        return Sequence(req, index, token_ids, gen, detok)

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
        if len(seq.output_ids) >= seq.request.max_new:
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
        return RequestOutput(req.request_id, req.prompt_ids, outs, finished, req.seqs[0].num_cached)
