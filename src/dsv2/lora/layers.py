"""Low-rank adapters (LoRA, Hu et al. 2021) on DeepSeek-V2's linears and routed experts, swapped in from outside
the model (attach.py), as dsv2.cpu and dsv2.quant swap theirs: the model stays plain.

    W' x = W x + s B A x,   A [r, in], B [out, r], s = alpha / r,   B = 0 at the start (W' = W)

Slots. A module holds L adapters stacked (A [L, r, in], B [L, out, r], zero-padded to one rank r: padding adds
nothing), and `Rows`, one object shared by a model's adapted modules, says which slot each row uses. The engine
sets it before each forward, so requests of different adapters and of the base model run in one batch: the rows of
each adapter present are gathered and get their two small GEMMs (the Punica / S-LoRA idea on a CPU: one GEMM pair
per adapter in the batch, not per request). With no per-row slots (training, or one adapter loaded by
load_adapter) every row uses slot 0.

Routed experts (LoRAExperts): one A/B pair per expert and projection, stacked by (slot, expert) as
[L * E, r, in], and applied inside the experts' grouped GEMMs: the copies (sorted by expert) of each slot are one
grouped GEMM pair over that slot's E adapters, never a loop over experts.

kv_b_proj under weight absorption (decode) is never multiplied out: MLA asks the adapter for its rank-r
correction of W_UK^T q and of W_UV o (`absorbed_query`, `absorbed_output`), so the latent cache and the absorbed
weights stay the base model's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model.experts import grouped_mm, local_block

Groups = list[tuple[int, torch.Tensor | None]]
"""(slot, the row indices that use it) per slot present; None: every row."""


class Rows:
    """Which adapter slot each row of the next forward uses (shared by a model's adapted modules).

    slot_T: one slot per token of the forward (-1: the base model), or None: every row uses slot 0. Most adapted
    linears see exactly those tokens. kv_b_proj and MLA's absorbed path see the rows of one attention call, whose
    batch rows a cache may pick from the tokens (one prefill segment, the decode rows): the cache names them with
    `call(token_index_B)` (engine/paged.py)."""

    def __init__(self):
        self.slot_T: torch.Tensor | None = None
        self.copy_slot_N: torch.Tensor | None = None  # the routed experts' copies: set by SlotDispatch
        self._call_B: torch.Tensor | None = None
        self._groups: Groups = [(0, None)]

    def set(self, slot_T: torch.Tensor | None) -> None:
        self.slot_T, self.copy_slot_N = slot_T, None
        self._groups = [(0, None)] if slot_T is None else groups_of(slot_T)

    @contextlib.contextmanager
    def call(self, token_B: torch.Tensor | list[int]) -> Iterator[None]:
        """Within: the attention call's batch row b is token token_B[b] of the forward (no-op without slot_T)."""
        if self.slot_T is None:
            yield
            return
        self._call_B = self.slot_T[torch.as_tensor(token_B, device=self.slot_T.device)]
        try:
            yield
        finally:
            self._call_B = None

    def groups(self, n_rows: int, batch: int = 1) -> Groups:
        """The groups of n_rows rows (of an input whose leading dim, a call's batch, is `batch`)."""
        if self.slot_T is None:
            return self._groups
        if self._call_B is not None:
            if n_rows % self._call_B.numel() or batch != self._call_B.numel():
                raise RuntimeError(f"LoRA rows: a call of {batch} batch rows, {self._call_B.numel()} named")
            return groups_of(self._call_B.repeat_interleave(n_rows // batch))
        if n_rows != self.slot_T.numel():
            raise RuntimeError(f"LoRA rows: {n_rows} rows, slots set for {self.slot_T.numel()} (a cache must name "
                               "the rows of its attention calls: Rows.call)")
        return self._groups


def groups_of(slot_N: torch.Tensor) -> Groups:
    present = [int(s) for s in torch.unique(slot_N) if s >= 0]
    return [(s, (slot_N == s).nonzero()[:, 0]) for s in present]


def _kaiming_uniform_(A: torch.Tensor, generator: torch.Generator | None) -> None:
    """A as PEFT initialises it: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1 / math.sqrt(A.shape[-1])
    A.uniform_(-bound, bound, generator=generator)


class _Wrapper(nn.Module):
    """Reads of attributes it lacks reach the wrapped module (`base_layer`): code that reads a linear's weight or the
    experts' sizes reads the base's."""

    is_adapter = True  # what code that reads weights directly (dsv2.cpu's fused decode step) checks for

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_layer"], name)


class LoRA(nn.Module):
    """The A/B pairs of one adapted weight in L slots, and what each slot scales by."""

    def __init__(self, slots: int, r: int, in_features: int, out_features: int, dropout: float, rows: Rows):
        super().__init__()
        self.r = r
        self.lora_A = nn.Parameter(torch.zeros(slots, r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(slots, out_features, r))
        self.register_buffer("scaling", torch.zeros(slots), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.rows = rows

    def reset(self, slot: int, alpha: float, generator: torch.Generator | None = None) -> None:
        """A fresh adapter in `slot`: A as PEFT initialises it (Kaiming-uniform, a = sqrt(5)), B = 0."""
        with torch.no_grad():
            _kaiming_uniform_(self.lora_A[slot], generator)
            self.lora_B[slot].zero_()
            self.scaling[slot] = alpha / self.r

    def delta(self, x_NI: torch.Tensor, slot: int) -> torch.Tensor:
        """s B A x for the rows x_NI of one slot, in the adapter's dtype."""
        A, B = self.lora_A[slot], self.lora_B[slot]
        return F.linear(F.linear(self.dropout(x_NI.to(A.dtype)), A), B) * self.scaling[slot]

    def add_to(self, y: torch.Tensor, x: torch.Tensor, batch: int = 1) -> torch.Tensor:
        """y + s B A x per row's slot (y = the base's output for x)."""
        x_NI = x.reshape(-1, x.shape[-1])
        groups = self.rows.groups(x_NI.shape[0], batch)
        if groups == [(0, None)] or (len(groups) == 1 and groups[0][1].numel() == x_NI.shape[0]):
            return y + self.delta(x_NI, groups[0][0]).view(y.shape).to(y.dtype)
        y_NO = y.reshape(-1, y.shape[-1])
        for slot, idx in groups:
            y_NO = y_NO.index_add(0, idx, self.delta(x_NI.index_select(0, idx), slot).to(y.dtype))
        return y_NO.view(y.shape)


class LoRALinear(_Wrapper):
    """A linear (nn.Linear, or dsv2.quant's QuantLinear) with LoRA slots; reads of the base's attributes (weight,
    weight_q, in_features, ...) reach the base."""

    def __init__(self, base: nn.Module, slots: int, r: int, dropout: float, rows: Rows):
        super().__init__()
        self.base_layer = base
        self.lora = LoRA(slots, r, base.in_features, base.out_features, dropout, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora.add_to(self.base_layer(x), x, x.shape[0] if x.dim() == 3 else 1)

    # -- weight absorption (MLA's decode path) --------------------------------------------------------------------
    def absorbed_query(self, q_HMN: torch.Tensor, n_nope: int, batch: int) -> torch.Tensor:
        """The adapter's part of W_UK^T q per head, s A^T (B_K^T q): [H, M, C] (M = the call's batch * S rows)."""
        def part(B_HWr, A_rC, q_HmN):
            return torch.bmm(q_HmN, B_HWr[:, :n_nope]) @ A_rC
        return self._per_slot(q_HMN, part, self.lora.lora_A.shape[-1], batch)

    def absorbed_output(self, o_lat_HMC: torch.Tensor, n_nope: int, batch: int) -> torch.Tensor:
        """The adapter's part of W_UV o per head, s B_V (A o): [H, M, V]."""
        H = o_lat_HMC.shape[0]

        def part(B_HWr, A_rC, o_HmC):
            return torch.bmm(o_HmC @ A_rC.t(), B_HWr[:, n_nope:].transpose(1, 2))
        return self._per_slot(o_lat_HMC, part, self.lora.lora_B.shape[1] // H - n_nope, batch)

    def _per_slot(self, x_HMK: torch.Tensor, part, width: int, batch: int) -> torch.Tensor:
        """part(B of the slot per head [H, W, r], A [r, C], its rows of x) * s, for each slot's rows of x."""
        H, M, _ = x_HMK.shape
        lora = self.lora
        B_LHWr = lora.lora_B.view(lora.lora_B.shape[0], H, -1, lora.r)
        groups = lora.rows.groups(M, batch)
        if groups == [(0, None)]:  # every row one slot (training, load_adapter): no scatter
            return part(B_LHWr[0], lora.lora_A[0], x_HMK.to(lora.lora_A.dtype)) * lora.scaling[0]
        out = x_HMK.new_zeros(H, M, width, dtype=lora.lora_A.dtype)
        for slot, idx in groups:
            x = x_HMK[:, idx].to(lora.lora_A.dtype)
            out[:, idx] = part(B_LHWr[slot], lora.lora_A[slot], x) * lora.scaling[slot]
        return out


class SlotDispatch:
    """Mixed into a MoE layer's dispatcher class (attach.py): records the slot of each routed copy for the experts'
    adapters (a copy's slot is its token's). A mixin, not a wrapper: code that asks what kind of dispatcher a layer
    has (local, or expert parallelism's) still gets its answer."""

    rows: Rows

    def dispatch(self, x_TD, routing, overlap=None):
        x_ND, counts_E, d = super().dispatch(x_TD, routing, overlap)
        if self.rows.slot_T is not None:
            self.rows.copy_slot_N = self.rows.slot_T[d.token_N]
        return x_ND, counts_E, d


class LoRAExperts(_Wrapper):
    """Routed experts (any of model/cpu/quant's) with an adapter per expert and projection: gate_proj and up_proj's
    A stacked as lora_A_gate_up [L*E, 2r, D], their B as lora_B_gate / lora_B_up [L*E, F, r], down_proj's as
    lora_A_down [L*E, r, F] and lora_B_down [L*E, D, r]."""

    def __init__(self, base: nn.Module, slots: int, r: int, dropout: float, rows: Rows):
        super().__init__()
        self.base_layer, self.rows, self.r = base, rows, r
        E, D, F_ = base.n_experts, base.hidden, base.inter
        self.lora_A_gate_up = nn.Parameter(torch.zeros(slots * E, 2 * r, D))
        self.lora_B_gate = nn.Parameter(torch.zeros(slots * E, F_, r))
        self.lora_B_up = nn.Parameter(torch.zeros(slots * E, F_, r))
        self.lora_A_down = nn.Parameter(torch.zeros(slots * E, r, F_))
        self.lora_B_down = nn.Parameter(torch.zeros(slots * E, D, r))
        self.register_buffer("scaling", torch.zeros(slots), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def shard(self, lo: int, hi: int) -> list[nn.Parameter]:
        """The base's experts lo .. hi-1 and their adapters (one slot: training)."""
        out = self.base_layer.shard(lo, hi)
        for name, old in list(self.named_parameters(recurse=False)):
            p = nn.Parameter(old.detach()[lo:hi].clone(), requires_grad=old.requires_grad)
            setattr(self, name, p)
            out.append(p)
        return out

    def reset(self, slot: int, alpha: float, generator: torch.Generator | None = None) -> None:
        E = self.base_layer.n_experts
        with torch.no_grad():
            for A in (self.lora_A_gate_up, self.lora_A_down):
                _kaiming_uniform_(A[slot * E:(slot + 1) * E], generator)
            for B in (self.lora_B_gate, self.lora_B_up, self.lora_B_down):
                B[slot * E:(slot + 1) * E].zero_()
            self.scaling[slot] = alpha / self.r

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate_NF, up_NF = self.base_layer.grouped(x_ND, "gate_up_proj", counts_E).chunk(2, dim=-1)
        groups = self._copy_groups(x_ND.shape[0], counts_E)
        d_gate, d_up = self._delta(x_ND, groups, self.lora_A_gate_up, (self.lora_B_gate, self.lora_B_up))
        h_NF = self.base_layer.act(gate_NF + d_gate) * (up_NF + d_up)
        y_ND = self.base_layer.grouped(h_NF, "down_proj", counts_E)
        return y_ND + self._delta(h_NF, groups, self.lora_A_down, (self.lora_B_down,))[0]

    def _copy_groups(self, N: int, counts_E: torch.Tensor) -> list[tuple[int, torch.Tensor | None, torch.Tensor]]:
        """(slot, its copies or None for all, the copies of each of its E experts) per slot present."""
        slot_N = self.rows.copy_slot_N
        if slot_N is None or slot_N.numel() != N:
            return [(0, None, counts_E)]
        expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E)
        return [(s, idx, torch.bincount(expert_N[idx], minlength=counts_E.numel())) for s, idx in groups_of(slot_N)]

    def _delta(self, x_NK, groups, A_GRK, Bs) -> list[torch.Tensor]:
        """s B A x for each B of Bs (A's rows split evenly among them), per copy's slot and expert."""
        E = self.base_layer.n_experts
        A_GRK, Bs = local_block(A_GRK), [local_block(B) for B in Bs]  # this rank's experts' adapters (under EP)
        every = len(groups) == 1 and groups[0][1] is None  # one group of all copies (training): its deltas are the
        outs = [None if every else x_NK.new_zeros(x_NK.shape[0], B.shape[1]) for B in Bs]  # outputs: no zeros first
        for slot, idx, counts_E in groups:
            ends = counts_E.cumsum(0).to(torch.int32)
            e = slice(slot * E, (slot + 1) * E)
            x = x_NK if idx is None else x_NK.index_select(0, idx)
            h_NR = grouped_mm(self.dropout(x.to(A_GRK.dtype)).contiguous(), A_GRK[e].transpose(-2, -1), ends)
            for i, (B, h) in enumerate(zip(Bs, h_NR.chunk(len(Bs), dim=-1), strict=True)):
                d = (grouped_mm(h.contiguous(), B[e].transpose(-2, -1), ends) * self.scaling[slot]).to(x_NK.dtype)
                outs[i] = d if idx is None else outs[i].index_add(0, idx, d)
        return outs
