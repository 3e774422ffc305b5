// dsv2's CPU kernels as the CPU implementation of the torch.ops.dsv2 custom ops, whose schemas, reference and fake
// implementations dsv2/cpu/ops.py defines before this library loads (dsv2/cpu/build.py builds and loads it).
#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

TORCH_LIBRARY_IMPL(dsv2, CPU, m) {
  m.impl("mla_decode", &mla_decode);    // MLA absorbed decode attention over the latent cache (mla_decode.cpp)
  m.impl("mla_decode_paged", &mla_decode_paged);  // the same over a paged cache, through its block table
  m.impl("rows_dot", &rows_dot);        // y[n] = w[g] x[n] for the rows n of each group g of a few rows x
  m.impl("rms_norm", &rms_norm);        // w * RMSNorm(x) for a few rows (rms_norm.cpp)
  m.impl("dequantize", &dequantize);
  m.impl("quantize_rows", &quantize_rows);  // a float weight -> its blocked int8/int4 rows (few_rows.cpp)    // blocked int8/int4 rows -> a dense weight (few_rows.cpp, quantized.h)
  m.impl("rows_combine", &rows_combine);  // y[g, m] = sum_n x[g, n, m] w[g, n] for a few rows x (few_rows.cpp)
  m.impl("attention_decode", &attention_decode);  // a decode step's MLA block, residual to residual (decode_step.cpp)
  m.impl("ffn_decode", &ffn_decode);    // a decode step's MoE or dense FFN block, residual to residual
}
