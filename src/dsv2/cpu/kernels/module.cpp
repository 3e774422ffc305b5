// dsv2's CPU kernels as the CPU implementation of the torch.ops.dsv2 custom ops, whose schemas, reference and fake
// implementations dsv2/cpu/ops.py defines before this library loads (dsv2/cpu/build.py builds and loads it).
#include <torch/extension.h>
#include <torch/library.h>

#include <optional>

torch::Tensor mla_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, int64_t C);
torch::Tensor mla_decode_paged(torch::Tensor q, torch::Tensor blocks, torch::Tensor table, torch::Tensor lens,
                               int64_t C);
torch::Tensor rows_dot(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> ends);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rows_combine(torch::Tensor x, torch::Tensor w);
torch::Tensor attention_decode(torch::Tensor x, torch::Tensor norm, std::optional<torch::Tensor> q_a,
                               std::optional<torch::Tensor> q_a_norm, torch::Tensor q_w, torch::Tensor kv_a,
                               torch::Tensor kv_a_norm, torch::Tensor kv_b, torch::Tensor o_w, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor rows, torch::Tensor slots, torch::Tensor kv,
                               torch::Tensor mask, std::optional<torch::Tensor> table, std::optional<torch::Tensor> lens,
                               int64_t H, int64_t N, int64_t R, int64_t V, double eps, double q_eps, double kv_eps,
                               double scale);
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor norm, double eps, std::optional<torch::Tensor> gate,
                         std::optional<torch::Tensor> gate_up, std::optional<torch::Tensor> down, int64_t top_k,
                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling,
                         std::optional<torch::Tensor> shared_gate, std::optional<torch::Tensor> shared_up,
                         std::optional<torch::Tensor> shared_down);

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
  m.impl("mla_decode", &mla_decode);    // MLA absorbed decode attention over the latent cache (mla_decode.cpp)
  m.impl("mla_decode_paged", &mla_decode_paged);  // the same over a paged cache, through its block table
  m.impl("rows_dot", &rows_dot);        // y[n] = w[g] x[n] for the rows n of each group g of a few rows x
  m.impl("rms_norm", &rms_norm);        // w * RMSNorm(x) for a few rows (rms_norm.cpp)
  m.impl("rows_combine", &rows_combine);  // y[g, m] = sum_n x[g, n, m] w[g, n] for a few rows x (few_rows.cpp)
  m.impl("attention_decode", &attention_decode);  // a decode step's MLA block, residual to residual (decode_step.cpp)
  m.impl("ffn_decode", &ffn_decode);    // a decode step's MoE or dense FFN block, residual to residual
}
