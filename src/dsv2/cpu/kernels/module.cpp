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

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
  m.impl("mla_decode", &mla_decode);    // MLA absorbed decode attention over the latent cache (mla_decode.cpp)
  m.impl("mla_decode_paged", &mla_decode_paged);  // the same over a paged cache, through its block table
  m.impl("rows_dot", &rows_dot);        // y[n] = w[g] x[n] for the rows n of each group g of a few rows x
  m.impl("rms_norm", &rms_norm);        // w * RMSNorm(x) for a few rows (rms_norm.cpp)
  m.impl("rows_combine", &rows_combine);  // y[g, m] = sum_n x[g, n, m] w[g, n] for a few rows x (few_rows.cpp)
}
