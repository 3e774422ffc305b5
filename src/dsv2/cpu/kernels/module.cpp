// dsv2's CPU decode kernels as one torch extension, built at first use by dsv2.fastpath.
#include <torch/extension.h>

#include <optional>

torch::Tensor mla_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, int64_t C);
torch::Tensor rows_dot(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> ends);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor rows_combine(torch::Tensor x, torch::Tensor w);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mla_decode", &mla_decode, "MLA absorbed decode attention over the latent cache (mla_decode.cpp)");
  m.def("rows_dot", &rows_dot, "y[n] = w[g] x[n] for the rows n of each group g of a few rows x (few_rows.cpp)",
        py::arg("x"), py::arg("w"), py::arg("ends") = py::none());
  m.def("rms_norm", &rms_norm, "w * RMSNorm(x) for a few rows, as dsv2.attention.RMSNorm (rms_norm.cpp)");
  m.def("rows_combine", &rows_combine, "y[g, m] = sum_n x[g, n, m] w[g, n] for a few rows x (few_rows.cpp)");
}
