"""The measurement both step-driven engines go through (dsv2's, and vLLM's in its own venv): standard library only,
so that benchmarks/peer_vllm.py can import it there.

A cell is a set of prompts submitted together, each for `max_tokens` greedy tokens. Driving the engine one step at
a time, every new token of every request is timestamped; from those:
- ttft_s: from submission to the last request's first token (prefill of the whole set);
- ms_per_step: decode steps with every request running: from the last first token to the first request's end,
  divided by the tokens a request produced in between (at batch 1: ms per token from the 1st to the last).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def run_cell(add: Callable[[str, list[int], int], None], step: Callable[[], list[tuple[str, int]]],
             busy: Callable[[], bool], prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    """add(request_id, prompt_ids, max_tokens); step() -> [(request_id, tokens so far)] of the requests that
    moved; busy() while any request runs."""
    t0 = time.perf_counter()
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        add(rid, p, max_tokens)
    stamps: dict[str, list[float]] = {rid: [] for rid in ids}
    while busy():
        moved = step()
        now = time.perf_counter()
        for rid, n in moved:
            stamps[rid] += [now] * (n - len(stamps[rid]))
    first = max(s[0] for s in stamps.values())
    end = min(s[-1] for s in stamps.values())
    per = [(end - first) / max(sum(first < t <= end for t in s), 1) for s in stamps.values()]
    return {"ttft_s": first - t0, "ms_per_step": 1e3 * statistics.median(per),
            "tokens": [len(s) for s in stamps.values()]}
