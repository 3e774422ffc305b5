// RMSNorm of a few rows (decode): y = w * (x * rsqrt(mean(x^2) + eps)), the normalised x rounded to x's dtype
// before the scale, as dsv2.model.norm.RMSNorm and the official checkpoints' code compute it. One fused pass:
// PyTorch's rms_norm is a composite of several ops, each with a fixed cost, and a decode step runs 13 of them.
#include <torch/extension.h>

#include <cmath>

namespace {

template <typename T>
void norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t D, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<float>(xr[d]) * static_cast<float>(xr[d]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d)
      y[r * D + d] = static_cast<T>(static_cast<float>(w[d]) * static_cast<float>(static_cast<T>(xr[d] * inv)));
  }
}

}  // namespace

// x [..., D] and w [D], both fp32 or both bf16 -> y like x
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors expected");
  TORCH_CHECK(w.dim() == 1 && x.size(-1) == w.size(0), "rms_norm: w [D] must match x [..., D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rms_norm: x and w must both be fp32 or both bf16");
  const auto xc = x.contiguous(), wc = w.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t D = w.size(0), rows = D == 0 ? 0 : xc.numel() / D;
  if (x.scalar_type() == at::kFloat)
    norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, D, eps);
  else
    norm_rows(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, D, eps);
  return y;
}
