"""A decode step in a few calls: one new token per sequence through every layer, two C++ calls per layer.

A batch-1 decode step reads each active weight once and does little else, so on a CPU it should cost what its
bytes cost. Run module by module it does not: between the weight-streaming kernels the plain model issues ~1,100
small ATen ops per step (norms, views, casts, RoPE, the router's top-k and group mask, the copies' sort, the
combine, residual adds), each paying Python's and the dispatcher's fixed cost. DecodeStep runs each layer's
attention block and FFN block as one op each (ops.attention_decode, ops.ffn_decode: kernels/decode_step.cpp), over
the same few-row kernels the CPU modules use, reading the model's own parameters in place: no weight is copied
or prepared, no module is changed (the caller's model keeps its classes), and a model being trained can be sampled
from between its steps.

Where it does not apply it says so (`DecodeStep.reason`) and the caller runs the plain forward: the MHA/GQA/MQA
baselines, non-SiLU experts, other devices, more rows than the few-row kernels serve, autograd, kernels not built.
The plain model is the reference: tests/test_decode_step.py holds the two equal (fp32 1e-5; bf16 to its rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import DeepseekV2
from ..model.attention import MLA
from ..model.experts import ACTIVATIONS
from ..model.moe import MLP, LocalDispatcher, MoE
from . import ops
from .modules import NATIVE_BF16_EXPERT_ROWS, SMALL_ROWS, kernel_weight

SILU = ACTIVATIONS["silu"]


def _silu(module: nn.Module) -> bool:
    act = module.experts.act if isinstance(module, MoE) else module.act
    return act is SILU and (not isinstance(module, MoE) or module.shared_experts is None
                            or module.shared_experts.act is SILU)


class DecodeStep:
    """The fused decode step of one model: `step(ids, positions, cache)` -> logits for one new token per sequence,
    appended to `cache` (a model/cache.py KVCache, or the engine's StepBatch of decode tokens)."""

    def __init__(self, model: DeepseekV2):
        self.model = model
        self.reason = self._unsupported(model)
        self._experts = next((b.mlp.experts for b in model.model.layers if isinstance(b.mlp, MoE)), None)

    @staticmethod
    def _unsupported(model: DeepseekV2) -> str | None:
        if model.config.attention_type != "mla":
            return "the MHA/GQA/MQA baselines take the plain path"
        if any(getattr(m, "is_adapter", False) for m in model.modules()):  # the engine checks each step's rows
            return "LoRA adapters (dsv2.lora) take the plain path"
        if not all(_silu(b.mlp) for b in model.model.layers):
            return "the fused FFN computes SiLU experts only"
        if any(isinstance(b.mlp, MoE) and not isinstance(b.mlp.dispatcher, LocalDispatcher)
               for b in model.model.layers):
            return "expert parallelism dispatches the routed experts across ranks"
        weights = list(model.parameters())  # quantized rows (dsv2.quant) are buffers: any mix of them is read
        if any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) for p in weights):
            return "the kernels take fp32 or bf16 CPU weights"
        if len({p.dtype for p in weights}) != 1:
            return "the weights are of mixed dtypes"
        if any(b.device.type != "cpu" for b in model.buffers()):
            return "the kernels take CPU weights"
        if not ops.load_kernels():
            return "the CPU kernels are not built"
        return None

    def max_rows(self) -> int:
        """Sequences per step the few-row kernels serve (a grouped GEMM beats them past it: modules.py)."""
        e = self._experts
        if e is not None and kernel_weight(e, "gate_up_proj").dtype == torch.bfloat16 and ops.native_bf16():
            return NATIVE_BF16_EXPERT_ROWS
        return SMALL_ROWS

    def applies(self, n_tokens: int) -> bool:
        return (self.reason is None and 1 <= n_tokens <= self.max_rows() and not torch.is_grad_enabled()
                and not self.model.training)

    def __call__(self, ids_BS: torch.Tensor, positions_BS: torch.Tensor, cache) -> torch.Tensor:
        """As model(ids_BS, positions=positions_BS, cache=cache) where every token is the one new token of its
        sequence ([B, 1] over a KVCache, the engine's flat [1, N] over its StepBatch): logits [B * S, V]."""
        m = self.model
        S, T = ids_BS.shape[1], ids_BS.numel()
        cache.start(S, None, None)
        cos_TR, sin_TR = (t.reshape(T, -1).contiguous() for t in m.rotary(positions_BS))
        x_TD = m.model.embed_tokens(ids_BS.reshape(T))
        for i, layer in enumerate(m.model.layers):
            x_TD = self._attention(layer, x_TD, cos_TR, sin_TR, cache.latent_decode(i))
            x_TD = self._ffn(layer, x_TD)
        cache.finish(S)
        norm = m.model.norm
        return ops.rows_dot(ops.rms_norm(x_TD, norm.weight, norm.eps), kernel_weight(m.lm_head))

    @staticmethod
    def _attention(layer, x_BD, cos_BR, sin_BR, lat) -> torch.Tensor:
        a: MLA = layer.self_attn
        lora = hasattr(a, "q_a_proj")
        w = kernel_weight
        q_a, q_a_norm = (w(a.q_a_proj), a.q_a_layernorm) if lora else (None, None)
        q = w(a.q_b_proj) if lora else w(a.q_proj)
        return ops.attention_decode(
            x_BD, layer.input_layernorm.weight, q_a, None if q_a_norm is None else q_a_norm.weight, q,
            w(a.kv_a_proj_with_mqa), a.kv_a_layernorm.weight, w(a.kv_b_proj), w(a.o_proj), cos_BR, sin_BR,
            lat.rows, lat.slots, lat.kv, lat.mask, lat.table, lat.lens, a.n_heads, a.nope, a.rope, a.v_dim,
            layer.input_layernorm.eps, 0.0 if q_a_norm is None else q_a_norm.eps, a.kv_a_layernorm.eps, a.scale)

    @staticmethod
    def _ffn(layer, x_BD) -> torch.Tensor:
        mlp, norm = layer.mlp, layer.post_attention_layernorm
        w = kernel_weight
        if isinstance(mlp, MLP):
            return ops.ffn_decode(x_BD, norm.weight, norm.eps, None, None, None, 1, 1, 1, False, 1.0,
                                  w(mlp.gate_proj), w(mlp.up_proj), w(mlp.down_proj))
        g, s, e = mlp.gate, mlp.shared_experts, mlp.experts
        grouped = g.method != "greedy" and g.topk_group < g.n_group
        return ops.ffn_decode(x_BD, norm.weight, norm.eps, g.weight, w(e, "gate_up_proj"), w(e, "down_proj"),
                              g.top_k, g.n_group if grouped else 1, g.topk_group if grouped else 1,
                              g.norm_topk_prob, g.scaling, *(None, None, None) if s is None else
                              (w(s.gate_proj), w(s.up_proj), w(s.down_proj)))
