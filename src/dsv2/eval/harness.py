"""lm-evaluation-harness in-process: `dsv2.eval.LMEvalModel(engine)`, lm_eval's LM interface on the engine, so that
`lm_eval.simple_evaluate(model=LMEvalModel(engine), tasks=[...])` (and `dsv2 eval --tasks`) runs without a server.

It is lm_eval's own TemplateLM (the harness's tokenization of context/continuation pairs, its empty-context rule),
with the scoring on the engine: each (context, continuation) is one request whose prompt is context + continuation
(left-truncated to max_length, as the harness's API models do), asking for its prompt's log-probabilities
(SamplingParams.prompt_logprobs): the continuation's sum and whether each of its tokens was the top one. All
requests go to the engine at once, which batches them continuously; loglikelihood_rolling cuts a text into the
harness's rolling windows; generate_until maps `until`, `max_gen_toks`, `temperature` onto SamplingParams. Through
the server (`local-completions`, echo + logprobs) the same prompts give the same numbers.

lm_eval is not a dependency of dsv2: this module imports it (pip install 'dsv2[eval]').
"""

from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from ..inference.engine import Engine, SamplingParams


class LMEvalModel(TemplateLM):
    """lm_eval's LM on a dsv2 Engine (its tokenizer required). max_length: the prompt tokens a request may hold
    (default and at most: the engine's max_model_len - 1, room for the one token each request samples); the prefix
    token of an empty context: BOS, else EOS."""

    def __init__(self, engine: Engine, max_length: int | None = None, progress: bool = True):
        super().__init__()
        if engine.tokenizer is None:
            raise ValueError("lm-evaluation-harness needs the checkpoint's tokenizer.json")
        self.engine, self.progress = engine, progress
        self.max_length = min(max_length or engine.max_model_len, engine.max_model_len - 1)

    @property
    def eot_token_id(self) -> int:
        return min(self.engine.eos_ids) if self.engine.eos_ids else self.engine.bos_id

    @property
    def prefix_token_id(self) -> int:
        return self.engine.bos_id if self.engine.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.encode(string, bos=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        prompts, conts = [], []
        for _, context_enc, continuation_enc in requests:
            ids = (context_enc + continuation_enc)[-self.max_length:]
            prompts.append(ids)
            conts.append(min(len(continuation_enc), len(ids) - 1))
        outs = self.engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                                    progress=self.progress and not disable_tqdm)
        results = []
        for out, n in zip(outs, conts, strict=True):
            scored = out.prompt_logprobs[len(out.prompt_logprobs) - n:] if n else []
            greedy = all(lp.top and lp.top[0][0] == lp.token_id for lp in scored)
            results.append((sum(lp.logprob for lp in scored), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((None, *w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += lp
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        prompts, params = [], []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm or not self.progress,
                                        desc="generate_until"):
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            max_gen = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
            max_gen = max(1, min(max_gen, self.max_length - 1))  # at least one token of context stays
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_gen, temperature=temperature,
                                         stop=[until] if isinstance(until, str) else list(until)))
        return [o.outputs[0].text for o in self.engine.generate(prompts, params, progress=False)]
