// Bindings of cpp/bf16.h and cpp/small_gemm_bf16.h: bfloat16 rounding, the weights'
// fingerprint, the bfloat16 GEMM kernels and the choice of kernel.
#include "bf16.h"
#include "bind_common.h"
#include "blas.h"
#include "small_gemm_bf16.h"

#include <string>
#include <vector>

namespace moe_bind {

moe::Bf16Kernel kernel_named(const std::string& name) {
  using K = moe::Bf16Kernel;
  for (K k : {K::fallback, K::avx512_bf16, K::emulated, K::amx, K::amx_emulated})
    if (name == moe::bf16_kernel_name(k)) return k;
  throw std::invalid_argument("kernel: expected 'fallback', 'avx512_bf16', 'emulated', 'amx' or "
                              "'amx_emulated', got '" + name + "'");
}

void bind_bf16(py::module_& m) {
  m.def(
      "round_to_bf16",
      [](In<float> x) {
        py::array_t<float> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        const float* in = x.data();
        float* o = out.mutable_data();
        const index_t n = index_t(x.size());
        {
          py::gil_scoped_release release;
          moe::round_to_bf16(in, o, n);
        }
        return out;
      },
      py::kw_only(), py::arg("x"),
      "x rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as float32 values");
  m.def(
      "fingerprint",
      [](In<float> x) {
        const float* p = x.data();
        const index_t n = index_t(x.size());
        moe::Fingerprint f;
        {
          py::gil_scoped_release release;
          f = moe::fingerprint(p, n);
        }
        return py::bytes(reinterpret_cast<const char*>(f.lanes), sizeof f.lanes);
      },
      py::kw_only(), py::arg("x"),
      "64 bytes that change whenever any one value of x changes (bf16.h)");
  m.def(
      "bf16_kernel", [] { return std::string(moe::bf16_kernel_name(moe::bf16_kernel())); },
      "the bfloat16 GEMM kernel compute_dtype='bfloat16' runs on: 'amx', 'avx512_bf16' or "
      "'fallback' (or an emulation, when set)");
  m.def(
      "set_bf16_kernel", [](const std::string& kernel) { moe::set_bf16_kernel(kernel_named(kernel)); },
      py::kw_only(), py::arg("kernel"),
      "use this bfloat16 kernel from now on in this process (ValueError if it cannot run here)");
  m.def(
      "bf16_kernel_available",
      [](const std::string& kernel) { return moe::bf16_kernel_available(kernel_named(kernel)); },
      py::kw_only(), py::arg("kernel"), "whether this CPU and OS can run the kernel");
  m.def(
      "bf16_kernel_pays",
      [](const std::string& kernel) { return moe::bf16_kernel_pays(kernel_named(kernel)); },
      py::kw_only(), py::arg("kernel"),
      "whether the kernel, where it runs, is faster than the fallback on this CPU (may be the default)");
  m.def(
      "bf16_self_check",
      [](const std::string& kernel) {
        const moe::Bf16Kernel k = kernel_named(kernel);
        py::gil_scoped_release release;
        return moe::bf16_self_check(k);
      },
      py::kw_only(), py::arg("kernel"),
      "whether the kernel agrees with a float64 product on the built-in shapes");
  m.def(
      "small_gemm_bf16",
      [](const std::string& kernel, In<float> a, In<float> b, bool trans_a, bool trans_b,
         py::array c, bool accumulate, bool packed) {
        const moe::Bf16Kernel k = kernel_named(kernel);
        if (k == moe::Bf16Kernel::fallback || !moe::bf16_kernel_available(k))
          throw std::invalid_argument("kernel: '" + kernel + "' has no GEMM that runs here");
        const auto [M, N, K, lda, ldb] = gemm_dims(a, b, trans_a, trans_b);
        float* cp = inout<float>(c, "c", {M, N});
        moe::check_blas_dims({M, N, K});
        const float* ap = a.data();
        const float* bp = b.data();
        py::gil_scoped_release release;
        if (packed) {
          std::vector<std::uint32_t> pb(moe::packed_b_bf16_size(k, K, N));
          moe::pack_b_bf16(k, trans_b, K, N, bp, ldb, pb.data());
          moe::small_gemm_packed_bf16(k, trans_a, M, N, K, ap, lda, pb.data(), accumulate, cp, N);
        } else {
          moe::small_gemm_bf16(k, trans_a, trans_b, M, N, K, ap, lda, bp, ldb, accumulate, cp, N);
        }
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("kernel"), py::arg("a"),
      py::arg("b"), py::arg("trans_a"), py::arg("trans_b"), py::arg("c"), py::arg("accumulate"),
      py::arg("packed"),
      "c (+)= op(a) op(b) as bfloat16 products summed in float32 (a and b rounded to bfloat16 "
      "as packed), by one bfloat16 kernel");
}

}  // namespace moe_bind
