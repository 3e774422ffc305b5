"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every sequence is treated alike: it has `num_tokens` tokens (prompt, then output) of which `num_computed` have
their cache rows; a step computes up to the rest of them, within a per-step token budget
(max_num_batched_tokens). Running sequences go first, in the order they were admitted: a decode needs one token,
a prompt longer than the budget left is cut into chunks over several steps (chunked prefill), so decodes never
wait behind a long prompt. Then waiting sequences are admitted, first come first served, while the budget, the
max_num_seqs cap and the free blocks allow; a new prompt first takes what the prefix cache holds of it.

When a running sequence needs a block and none is free, the newest running sequences not yet scheduled in this
step are preempted: their blocks are released (the full ones stay in the prefix cache until evicted) and they go
back to the front of the waiting queue, to be recomputed from their tokens later. A preempted sequence keeps its
tokens and its sampling state, so it continues exactly where it stopped.
"""

from __future__ import annotations

from collections import deque

from .blocks import BlockPool
from .paged import PagedCache
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, pool: BlockPool, cache: PagedCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool, self.cache = pool, cache
        self.block_size = cache.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prompt_logprobs_uncached = 0  # prompts computed whole for their log-probabilities (no prefix cache)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) for the next step; blocks for them are allocated."""
        budget = self.max_num_batched_tokens
        out: list[tuple[Sequence, int]] = []
        chosen: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n_new = min(budget, seq.num_tokens - seq.num_computed)
            while not self._reserve(seq, n_new):
                victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in chosen), None)
                self._preempt(victim or seq)
                if victim is None:
                    break
            if seq.status is Status.RUNNING:
                out.append((seq, n_new))
                chosen.add(seq.seq_id)
                budget -= n_new
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.blocks:
                self._take_cached_prefix(seq)
            n_new = min(budget, seq.num_tokens - seq.num_computed)
            if not self._reserve(seq, n_new):
                break  # admission never preempts: it waits for blocks to come free
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.append((seq, n_new))
            budget -= n_new
        return out

    def computed(self, seq: Sequence, n_new: int) -> None:
        """After a step wrote n_new more of seq's tokens: its newly full blocks join the prefix cache."""
        before = seq.num_computed // self.block_size
        seq.num_computed += n_new
        hashes = seq.full_block_hashes(self.block_size, seq.num_computed)
        for i in range(before, seq.num_computed // self.block_size):
            self.pool.cache(seq.blocks[i], hashes[i])

    def fork(self, seq: Sequence, child: Sequence) -> None:
        """child continues from seq's tokens and blocks (shared: copy-on-write when it writes a partial one)."""
        child.token_ids = list(seq.token_ids)
        child.blocks = list(seq.blocks)
        child.hashes = list(seq.hashes)
        child.num_computed, child.num_cached = seq.num_computed, seq.num_cached
        for b in child.blocks:
            self.pool.share(b)
        child.status = Status.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """A finished or aborted sequence gives its blocks back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.status = Status.FINISHED

    # ------------------------------------------------------------------------------------------------------------
    def _take_cached_prefix(self, seq: Sequence) -> None:
        """The longest run of seq's full blocks the prefix cache holds, short of its last token (a step must
        compute at least one token to give the logits to sample from). None for a request that wants its prompt's
        log-probabilities: they need every prompt token computed (prompt_logprobs.py)."""
        if seq.request.prompt_logprobs is not None:
            if not seq.request.counted_uncached:  # once per request (it may wait, or be preempted, and come back)
                seq.request.counted_uncached = True
                self.prompt_logprobs_uncached += 1
            return
        for h in seq.full_block_hashes(self.block_size, seq.num_tokens - 1):
            block = self.pool.lookup(h)
            if block is None:
                break
            seq.blocks.append(block)
        seq.num_computed = len(seq.blocks) * self.block_size
        if not seq.output_ids:
            seq.num_cached = seq.num_computed

    def _reserve(self, seq: Sequence, n_new: int) -> bool:
        """Blocks for seq's next n_new tokens (a private copy of a shared block they write into); False, with
        nothing changed, if not enough are free."""
        bs = self.block_size
        first = seq.num_computed // bs
        needed = -(-(seq.num_computed + n_new) // bs) - len(seq.blocks)
        copy = first < len(seq.blocks) and self.pool.refs[seq.blocks[first]] > 1
        if not self.pool.can_allocate(max(needed, 0) + copy):
            return False
        if copy:
            fresh = self.pool.allocate()
            self.cache.copy_block(seq.blocks[first], fresh)
            self.pool.release([seq.blocks[first]])
            seq.blocks[first] = fresh
        seq.blocks.extend(self.pool.allocate() for _ in range(needed))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed = [], 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1
