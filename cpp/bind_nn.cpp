// Bindings of the transformer parts: linear, embedding rows, RMSNorm, attention.
#include "bind_common.h"
#include "attention.h"
#include "dispatch.h"
#include "linear.h"
#include "rmsnorm.h"

namespace moe_bind {

namespace {

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("linear_forward" + sfx).c_str(),
      [](In<T> x, In<T> w, bool bf16) {
        if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(0))
          throw std::invalid_argument("linear: expected x [n, in] and w [in, out]");
        const index_t n = x.shape(0), in = x.shape(1), out = w.shape(1);
        auto y = empty<T>({n, out});
        T* yp = y.mutable_data();
        py::gil_scoped_release release;
        moe::linear_forward<T>(x.data(), w.data(), n, in, out, yp, bf16);
        return y;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w"), py::arg("bf16") = false,
      "y = x @ w (bf16: bfloat16 operands, float32 sums; float32 only)");

  m.def(
      ("linear_backward" + sfx).c_str(),
      [](In<T> x, In<T> w, In<T> dy, py::array dw, bool need_dx, bool bf16) {
        const index_t n = x.shape(0), in = x.shape(1), out = w.shape(1);
        expect_shape(w, "w", {in, out});
        expect_shape(dy, "dy", {n, out});
        T* dwp = inout<T>(dw, "dw", {in, out});
        auto dx = empty<T>({need_dx ? n : 0, in});
        T* dxp = need_dx ? dx.mutable_data() : nullptr;
        py::gil_scoped_release release;
        moe::linear_backward<T>(x.data(), w.data(), dy.data(), n, in, out, dxp, dwp, bf16);
        return dx;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("dw"), py::arg("need_dx") = true,
      py::arg("bf16") = false,
      "dx = dy @ w.T (empty when need_dx is False); adds x.T @ dy into dw (bf16: bfloat16 operands, "
      "float32 sums; float32 only)");

  m.def(
      ("scatter_add_rows" + sfx).c_str(),
      [](In<T> dout, Idx ids, py::array table_grad) {
        const index_t n = dout.shape(0), d = dout.shape(1);
        expect_shape(ids, "ids", {n});
        if (table_grad.ndim() != 2) throw std::invalid_argument("table_grad: expected 2-d");
        const index_t V = table_grad.shape(0);
        T* g = inout<T>(table_grad, "table_grad", {V, d});
        for (index_t t = 0; t < n; ++t)
          if (ids.data()[t] < 0 || ids.data()[t] >= V)
            throw std::invalid_argument("ids: expected values in [0, " + std::to_string(V) + ")");
        py::gil_scoped_release release;
        moe::scatter_add_rows<T>(dout.data(), ids.data(), n, V, d, g);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("dout"), py::arg("ids"), py::arg("table_grad"),
      "table_grad[ids[t]] += dout[t], in token order");

  m.def(
      ("rmsnorm_forward" + sfx).c_str(),
      [](In<T> x, In<T> g, double eps) {
        const index_t n = x.shape(0), d = x.shape(1);
        expect_shape(g, "g", {d});
        auto y = empty<T>({n, d}), rstd = empty<T>({n});
        T *yp = y.mutable_data(), *rp = rstd.mutable_data();
        {
          py::gil_scoped_release release;
          moe::rmsnorm_forward<T>(x.data(), g.data(), n, d, T(eps), yp, rp);
        }
        return py::make_tuple(y, rstd);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("g"), py::arg("eps"),
      "y = x * rstd * g with rstd = 1/sqrt(mean(x^2) + eps); returns (y, rstd)");

  m.def(
      ("rmsnorm_backward" + sfx).c_str(),
      [](In<T> x, In<T> g, In<T> rstd, In<T> dy, py::array dg) {
        const index_t n = x.shape(0), d = x.shape(1);
        expect_shape(g, "g", {d});
        expect_shape(rstd, "rstd", {n});
        expect_shape(dy, "dy", {n, d});
        T* dgp = inout<T>(dg, "dg", {d});
        auto dx = empty<T>({n, d});
        T* dxp = dx.mutable_data();
        py::gil_scoped_release release;
        moe::rmsnorm_backward<T>(x.data(), g.data(), rstd.data(), dy.data(), n, d, dxp, dgp);
        return dx;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("g"), py::arg("rstd"), py::arg("dy"), py::arg("dg"),
      "dx of rmsnorm_forward; adds into dg");

  m.def(
      ("attention_forward" + sfx).c_str(),
      [](In<T> qkv, Mask mask, index_t heads) {
        if (qkv.ndim() != 3) throw std::invalid_argument("qkv: expected [B, S, 3D]");
        const index_t B = qkv.shape(0), S = qkv.shape(1), D3 = qkv.shape(2);
        if (heads < 1 || D3 % (3 * heads) != 0)
          throw std::invalid_argument("heads: expected to divide d_model");
        expect_shape(mask, "mask", {B, S});
        const moe::AttentionShape s{B, S, heads, D3 / 3 / heads};
        auto out = empty<T>({B, S, D3 / 3}), probs = empty<T>({B, heads, S, S});
        T *op = out.mutable_data(), *pp = probs.mutable_data();
        {
          py::gil_scoped_release release;
          moe::attention_forward<T>(s, qkv.data(), mask.data(), op, pp);
        }
        return py::make_tuple(out, probs);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("qkv"), py::arg("mask"), py::arg("heads"),
      "causal multi-head attention over qkv [B, S, 3D], padded keys hidden; returns (out, probs)");

  m.def(
      ("attention_backward" + sfx).c_str(),
      [](In<T> qkv, Mask mask, In<T> probs, In<T> dout, index_t heads) {
        const index_t B = qkv.shape(0), S = qkv.shape(1), D3 = qkv.shape(2);
        if (heads < 1 || D3 % (3 * heads) != 0)
          throw std::invalid_argument("heads: expected to divide d_model");
        expect_shape(mask, "mask", {B, S});
        expect_shape(probs, "probs", {B, heads, S, S});
        expect_shape(dout, "dout", {B, S, D3 / 3});
        const moe::AttentionShape s{B, S, heads, D3 / 3 / heads};
        auto dqkv = empty<T>({B, S, D3});
        T* dp = dqkv.mutable_data();
        py::gil_scoped_release release;
        moe::attention_backward<T>(s, qkv.data(), mask.data(), probs.data(), dout.data(), dp);
        return dqkv;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("qkv"), py::arg("mask"), py::arg("probs"), py::arg("dout"), py::arg("heads"),
      "dqkv of attention_forward from the saved probs");
}

}  // namespace

void bind_nn(py::module_& m) {
  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
