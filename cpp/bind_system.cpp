// Bindings of threads, the block cache, the finiteness check, build facts, the FMA peak loop and the plain GEMM.
#include "bind_common.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "blas.h"
#include "finite.h"
#include "machine.h"
#include "pool.h"
#include "small_gemm.h"

namespace moe_bind {

// More threads than this is a typo, not a machine: libgomp crashes or exits past ~40000.
constexpr int kMaxThreads = 1024;

std::atomic<int>& requested_threads() {
  static std::atomic<int> n{0};
  return n;
}

UseRequestedThreads::UseRequestedThreads() {
  const int n = requested_threads().load();
  if (n > 0 && omp_get_max_threads() != n) omp_set_num_threads(n);
}

namespace {

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("zeros" + sfx).c_str(),
      [](std::vector<index_t> shape) {
        std::size_t n = 1;
        for (index_t d : shape) {
          if (d < 0) throw std::invalid_argument("shape: expected sizes >= 0");
          n *= std::size_t(d);
        }
        // from the block cache, so that a per-step gradient buffer costs no fresh pages
        auto z = empty<T>({index_t(n)});
        T* p = z.mutable_data();
        {
          py::gil_scoped_release release;
          std::fill(p, p + n, T(0));
        }
        return z.reshape(std::vector<py::ssize_t>(shape.begin(), shape.end()));
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("shape"),
      "an array of zeros whose memory comes from the kernels' block cache");

  m.def(
      ("all_finite" + sfx).c_str(),
      [](py::array_t<T, py::array::c_style> a) {
        const T* p = a.data();
        const index_t n = index_t(a.size());
        py::gil_scoped_release release;
        return moe::all_finite(p, n);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("a"),
      "whether every value of a (C-contiguous) is finite: no NaN, no Inf");

  m.def(
      ("small_gemm" + sfx).c_str(),
      [](In<T> a, In<T> b, bool trans_a, bool trans_b, py::array c, bool accumulate, bool packed) {
        const auto [M, N, K, lda, ldb] = gemm_dims(a, b, trans_a, trans_b);
        T* cp = inout<T>(c, "c", {M, N});
        moe::check_blas_dims({M, N, K});
        const T* ap = a.data();
        const T* bp = b.data();
        py::gil_scoped_release release;
        if (packed) {
          std::vector<T> pb(moe::packed_b_size<T>(K, N));
          moe::pack_b(trans_b, K, N, bp, ldb, pb.data());
          moe::small_gemm_packed(trans_a, M, N, K, ap, lda, pb.data(), accumulate, cp, N);
        } else {
          moe::small_gemm(trans_a, trans_b, M, N, K, ap, lda, bp, ldb, accumulate, cp, N);
        }
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("a"), py::arg("b"),
      py::arg("trans_a"), py::arg("trans_b"), py::arg("c"), py::arg("accumulate"),
      py::arg("packed"),
      "c (+)= op(a) op(b) by the expert kernels' micro-kernel GEMM, one call (packed: op(b) "
      "packed beforehand, as for expert weights)");

  m.def(
      ("matmul" + sfx).c_str(),
      [](In<T> a, In<T> b) {
        const index_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
        expect_shape(b, "b", {K, N});
        auto c = empty<T>({M, N});
        T* cp = c.mutable_data();
        py::gil_scoped_release release;
        moe::gemm_tiled<T>(false, false, M, N, K, T(1), a.data(), K, b.data(), N, T(0), cp, N);
        return c;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("a"), py::arg("b"),
      "c = a @ b through the kernels' tiled GEMM path (the benchmarks' own SGEMM)");
}

}  // namespace

void bind_system(py::module_& m) {
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1 || n > kMaxThreads)
          throw std::invalid_argument("n: expected 1 to " + std::to_string(kMaxThreads) +
                                      " threads, got " + std::to_string(n));
        requested_threads().store(n);
        omp_set_num_threads(n);
      },
      py::kw_only(), py::arg("n"), "OpenMP threads of every later kernel call, from any thread");

  m.def("get_num_threads",
        []() {
          const int n = requested_threads().load();
          return n > 0 ? n : omp_get_max_threads();
        },
        "OpenMP threads the kernels run on");

  m.def("pool_cached_bytes", &moe::pool_cached_bytes,
        "bytes held in the kernels' block cache for reuse");

  m.def("pool_release", &moe::pool_release, "return the kernels' cached blocks to the OS");

  m.def(
      "build_facts",
      []() {
        py::dict d;
        for (const auto& kv : moe::build_facts()) d[kv.first.c_str()] = kv.second;
        return d;
      },
      "compiler, flags, compiled SIMD, OpenMP, Eigen and BLAS facts of this build");

  m.def(
      "fma_peak",
      [](index_t iters) {
        if (iters < 1) throw std::invalid_argument("iters: expected >= 1");
        moe::FmaPeakResult r;
        {
          py::gil_scoped_release release;
          r = moe::fma_peak(iters);
        }
        return py::make_tuple(r.flops, r.checksum);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("iters"), "FP32 FMA loop on every OpenMP thread: (flops done, checksum); time it");

  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
