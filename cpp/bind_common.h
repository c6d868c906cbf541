// What every bind_*.cpp shares. The bind_*.cpp files and bindings.cpp are the only
// files that see pybind11: they convert arrays, check shapes, release the GIL around
// kernels and return new arrays. Validation that names the user's argument lives in the
// Python layer; the checks here stop a mis-shaped call from ever reaching a kernel.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pool.h"
#include "small_gemm_bf16.h"
#include "tensor.h"

namespace moe_bind {

namespace py = pybind11;
using moe::index_t;

template <typename T>
using In = py::array_t<T, py::array::c_style | py::array::forcecast>;
using Mask = py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>;
using Idx = py::array_t<index_t, py::array::c_style | py::array::forcecast>;

template <typename A>
void expect_shape(const A& a, const char* name, std::initializer_list<index_t> shape) {
  bool ok = a.ndim() == py::ssize_t(shape.size());
  int i = 0;
  for (index_t s : shape) ok = ok && a.shape(i++) == s;
  if (!ok) {
    std::string want = "(", got = "(";
    for (index_t s : shape) want += std::to_string(s) + ",";
    for (int j = 0; j < a.ndim(); ++j) got += std::to_string(a.shape(j)) + ",";
    throw std::invalid_argument(std::string(name) + ": expected shape " + want + ") got " + got +
                                ")");
  }
}

// A buffer the kernel writes or accumulates into: must be the caller's own
// writable C-contiguous array of the right dtype (no silent copy).
template <typename T>
T* writable(py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style) || !a.writeable())
    throw std::invalid_argument(std::string(name) +
                                ": expected a writable C-contiguous array of the layer dtype");
  return static_cast<T*>(a.mutable_data());
}

template <typename T>
T* inout(py::array& a, const char* name, std::initializer_list<index_t> shape) {
  T* p = writable<T>(a, name);
  expect_shape(a, name, shape);
  return p;
}

// The dimensions of c = op(a) op(b) for the test bindings of the small GEMMs, checked.
struct GemmDims {
  index_t M, N, K, lda, ldb;
};
template <typename A, typename B>
GemmDims gemm_dims(const A& a, const B& b, bool trans_a, bool trans_b) {
  if (a.ndim() != 2 || b.ndim() != 2) throw std::invalid_argument("a, b: expected matrices");
  const index_t K = trans_a ? a.shape(0) : a.shape(1);
  if ((trans_b ? b.shape(1) : b.shape(0)) != K)
    throw std::invalid_argument("b: inner dimension does not match a's");
  return {trans_a ? a.shape(1) : a.shape(0), trans_b ? b.shape(0) : b.shape(1), K, a.shape(1),
          b.shape(1)};
}

// A new array whose memory comes from the block cache (pool.h) and returns
// there when NumPy frees it.
struct PoolBlock {
  void* p;
  std::size_t bytes;
};

template <typename T>
py::array_t<T> empty(std::initializer_list<index_t> shape) {
  std::size_t n = 1;
  for (index_t s : shape) n *= std::size_t(s);
  auto* block = new PoolBlock{moe::pool_alloc(n * sizeof(T)), n * sizeof(T)};
  py::capsule owner(block, [](void* b) {
    auto* blk = static_cast<PoolBlock*>(b);
    moe::pool_free(blk->p, blk->bytes);
    delete blk;
  });
  return py::array_t<T>(std::vector<py::ssize_t>(shape.begin(), shape.end()),
                        static_cast<T*>(block->p), owner);
}

// The thread count of set_num_threads, for every OS thread that calls a kernel: OpenMP
// keeps its count per calling thread, so without this a Python thread other than the one
// that called set_num_threads would run on OpenMP's default. 0 = not set.
std::atomic<int>& requested_threads();

// Applies requested_threads() to the calling thread; every kernel binding constructs one
// (py::call_guard) before it runs.
struct UseRequestedThreads {
  UseRequestedThreads();
};

// The bfloat16 GEMM kernel named `name` (small_gemm_bf16.h), or invalid_argument naming it.
moe::Bf16Kernel kernel_named(const std::string& name);

// One binder per kernel file; each binds a float32 (_f32) and a float64 (_f64) set
// where the kernel is typed, so no overload resolution can cast one dtype to the other.
void bind_router(py::module_& m);
void bind_dispatch(py::module_& m);
void bind_experts(py::module_& m);
void bind_nn(py::module_& m);
void bind_lm_losses(py::module_& m);
void bind_optim(py::module_& m);
void bind_system(py::module_& m);
void bind_bf16(py::module_& m);

}  // namespace moe_bind
