// Expert activations, forward and backward side by side.
//
// Every element goes through Eigen's packet (SIMD) path: values are processed
// in fixed-size stack blocks, never as maps over caller memory. Eigen peels
// unaligned heads of a map into scalar code, whose exp/erf differ from the
// packet ones in the last bit, and which elements get peeled depends on the
// buffer's address; fixed blocks make every element's bits address-independent.
#pragma once
#include <unsupported/Eigen/SpecialFunctions>

#include "tensor.h"

namespace moe {

constexpr index_t kActBlock = 16;
template <typename T>
using Block = Eigen::Array<T, kActBlock, 1>;

// Runs f(inputs, outputs) over [0, n) in kActBlock pieces held in Blocks.
template <typename T, typename F>
inline void blocked(index_t n, const T* const* in, int n_in, T* const* out, int n_out, F&& f) {
  Block<T> a[4], b[4];
  index_t i = 0;
  // full blocks: plain copies in and out (exact whatever the path), maths on the blocks
  for (; i + kActBlock <= n; i += kActBlock) {
    for (int q = 0; q < n_in; ++q) a[q] = Eigen::Map<const Block<T>>(in[q] + i);
    f(a, b);
    for (int q = 0; q < n_out; ++q) Eigen::Map<Block<T>>(out[q] + i) = b[q];
  }
  if (i == n) return;
  const index_t len = n - i;  // the tail, zero-padded to a whole block
  for (int q = 0; q < n_in; ++q) {
    a[q].setZero();
    for (index_t l = 0; l < len; ++l) a[q][l] = in[q][i + l];
  }
  f(a, b);
  for (int q = 0; q < n_out; ++q)
    for (index_t l = 0; l < len; ++l) out[q][i + l] = b[q][l];
}

// ---- y = exp(x - shift), the vectorised exp of softmax rows (y may be x) ----

template <typename T>
inline void exp_shifted(const T* x, T shift, T* y, index_t n) {
  const T* in[1] = {x};
  T* out[1] = {y};
  blocked<T>(n, in, 1, out, 1, [shift](const Block<T>* a, Block<T>* b) { b[0] = (a[0] - shift).exp(); });
}

// ---- SwiGLU gate: a = silu(h1) * h3 ------------------------------------------

template <typename T>
inline void swiglu_forward(const T* h1, const T* h3, T* a, index_t n) {
  const T* in[2] = {h1, h3};
  T* out[1] = {a};
  blocked<T>(n, in, 2, out, 1, [](const Block<T>* x, Block<T>* y) {
    const Block<T> s = T(1) / (T(1) + (-x[0]).exp());
    y[0] = x[0] * s * x[1];
  });
}

// From h1, h3 (saved) and da: a (recomputed, for dW2), dh1 and dh3.
// d silu(h)/dh = s + silu(h) (1 - s), s = sigmoid(h).
template <typename T>
inline void swiglu_backward(const T* h1, const T* h3, const T* da, T* a, T* dh1, T* dh3,
                            index_t n) {
  const T* in[3] = {h1, h3, da};
  T* out[3] = {a, dh1, dh3};
  blocked<T>(n, in, 3, out, 3, [](const Block<T>* x, Block<T>* y) {
    const Block<T> s = T(1) / (T(1) + (-x[0]).exp());
    const Block<T> si = x[0] * s;
    y[0] = si * x[1];
    y[1] = x[2] * x[1] * (s + si * (T(1) - s));
    y[2] = x[2] * si;
  });
}

// ---- clamped SwiGLU (gpt-oss): g = min(h1, limit), u = clamp(h3, -limit, limit),
//      a = (u + 1) * g * sigmoid(alpha g) ------------------------------------------
// The clamps are written as selects that keep x unless it lies beyond a bound, so a NaN
// passes through as it does through torch.clamp (a min() could turn it into the bound).

template <typename T>
inline void clamped_swiglu_forward(const T* h1, const T* h3, T* a, index_t n, T alpha, T limit) {
  const T* in[2] = {h1, h3};
  T* out[1] = {a};
  blocked<T>(n, in, 2, out, 1, [alpha, limit](const Block<T>* x, Block<T>* y) {
    const Block<T> g = (x[0] > limit).select(limit, x[0]);
    const Block<T> u = (x[1] > limit).select(limit, (x[1] < -limit).select(-limit, x[1]));
    const Block<T> s = T(1) / (T(1) + (-alpha * g).exp());
    y[0] = (u + T(1)) * g * s;
  });
}

// From h1, h3 (saved) and da: a (recomputed, for dW2), dh1 and dh3.
// d(g sigmoid(alpha g))/dg = s + alpha g s (1 - s). A clamp passes the gradient where its
// input lies within the bounds, bounds included, as torch.clamp's backward does: so
// h1 == limit and h3 == +-limit get their gradient and autograd is matched exactly.
template <typename T>
inline void clamped_swiglu_backward(const T* h1, const T* h3, const T* da, T* a, T* dh1, T* dh3,
                                    index_t n, T alpha, T limit) {
  const T* in[3] = {h1, h3, da};
  T* out[3] = {a, dh1, dh3};
  blocked<T>(n, in, 3, out, 3, [alpha, limit](const Block<T>* x, Block<T>* y) {
    const Block<T> g = (x[0] > limit).select(limit, x[0]);
    const Block<T> u = (x[1] > limit).select(limit, (x[1] < -limit).select(-limit, x[1]));
    const Block<T> s = T(1) / (T(1) + (-alpha * g).exp());
    const Block<T> gs = g * s;
    y[0] = (u + T(1)) * gs;
    y[1] = (x[0] > limit).select(T(0), x[2] * (u + T(1)) * (s + alpha * gs * (T(1) - s)));
    y[2] = (x[1] > limit || x[1] < -limit).select(T(0), x[2] * gs);
  });
}

// ---- GELU, erf form: a = h * Phi(h) -------------------------------------------

template <typename T>
inline void gelu_forward(const T* h, T* a, index_t n) {
  const T* in[1] = {h};
  T* out[1] = {a};
  blocked<T>(n, in, 1, out, 1, [](const Block<T>* x, Block<T>* y) {
    y[0] = T(0.5) * x[0] * (T(1) + (x[0] * T(M_SQRT1_2)).erf());
  });
}

// d gelu(h)/dh = Phi(h) + h phi(h)
template <typename T>
inline void gelu_backward(const T* h, const T* da, T* a, T* dh, index_t n) {
  const T* in[2] = {h, da};
  T* out[2] = {a, dh};
  blocked<T>(n, in, 2, out, 2, [](const Block<T>* x, Block<T>* y) {
    const Block<T> Phi = T(0.5) * (T(1) + (x[0] * T(M_SQRT1_2)).erf());
    const Block<T> phi = T(0.3989422804014327) * (T(-0.5) * x[0] * x[0]).exp();
    y[0] = x[0] * Phi;
    y[1] = x[1] * (Phi + x[0] * phi);
  });
}

}  // namespace moe
