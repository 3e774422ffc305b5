// The kernels' entry points: registered as the torch.ops.dsv2 ops by module.cpp, and called from C++ by the fused
// decode step (decode_step.cpp), which also runs several products in one parallel loop (rows_dots).
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

torch::Tensor mla_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, int64_t C);
torch::Tensor mla_decode_paged(torch::Tensor q, torch::Tensor blocks, torch::Tensor table, torch::Tensor lens,
                               int64_t C);
torch::Tensor rows_dot(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> ends);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor dequantize(torch::Tensor w, int64_t K, at::ScalarType dtype);
torch::Tensor quantize_rows(torch::Tensor w, int64_t bits, int64_t group, std::vector<double> clips);
torch::Tensor rows_combine(torch::Tensor x, torch::Tensor w, int64_t cols);
torch::Tensor attention_decode(torch::Tensor x, torch::Tensor norm, std::optional<torch::Tensor> q_a,
                               std::optional<torch::Tensor> q_a_norm, torch::Tensor q_w, torch::Tensor kv_a,
                               torch::Tensor kv_a_norm, torch::Tensor kv_b, torch::Tensor o_w, torch::Tensor cos,
                               torch::Tensor sin, torch::Tensor rows, torch::Tensor slots, torch::Tensor kv,
                               torch::Tensor mask, std::optional<torch::Tensor> table,
                               std::optional<torch::Tensor> lens,
                               int64_t H, int64_t N, int64_t R, int64_t V, double eps, double q_eps, double kv_eps,
                               double scale);
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor norm, double eps, std::optional<torch::Tensor> gate,
                         std::optional<torch::Tensor> gate_up, std::optional<torch::Tensor> down, int64_t top_k,
                         int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling,
                         std::optional<torch::Tensor> shared_gate, std::optional<torch::Tensor> shared_up,
                         std::optional<torch::Tensor> shared_down);
std::vector<torch::Tensor> rows_dots(
    const std::vector<std::tuple<torch::Tensor, torch::Tensor, std::optional<torch::Tensor>>>& products);
