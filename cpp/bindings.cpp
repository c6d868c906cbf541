// The only file that sees pybind11: converts arrays, checks shapes, releases
// the GIL around kernels and returns new arrays. Validation that names the
// user's argument lives in the Python layer; the checks here stop a
// mis-shaped call from ever reaching a kernel.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "blas.h"
#include "dispatch.h"
#include "attention.h"
#include "experts.h"
#include "linear.h"
#include "machine.h"
#include "optim.h"
#include "lm_losses.h"
#include "pool.h"
#include "rmsnorm.h"
#include "router.h"

namespace py = pybind11;
using moe::index_t;

namespace {

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

// A gradient buffer the kernel accumulates into: must be the caller's own
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

moe::RouterOptions router_options(index_t k, bool normalize, bool ste, bool training,
                                  double noise_std, std::uint64_t seed, std::uint64_t step,
                                  double capacity_factor) {
  moe::RouterOptions o;
  o.top_k = k;
  o.normalize_topk = normalize;
  o.straight_through = ste;
  o.training = training;
  o.noise_std = noise_std;
  o.noise_seed = seed;
  o.noise_step = step;
  o.capacity_factor = capacity_factor;
  return o;
}

// One set of kernels per dtype, by name (router_forward_f32, ..._f64): no
// overload resolution that could cast one dtype to the other.
template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("router_forward" + sfx).c_str(),
      [](In<T> x, In<T> w, Mask mask, index_t k, bool normalize, bool ste, bool training,
         double noise_std, std::uint64_t seed, std::uint64_t step, double capacity_factor) {
        if (x.ndim() != 2) throw std::invalid_argument("x: expected a 2-d array");
        const index_t n = x.shape(0), D = x.shape(1);
        if (w.ndim() != 2) throw std::invalid_argument("w_router: expected a 2-d array");
        const index_t E = w.shape(1);
        expect_shape(w, "w_router", {D, E});
        expect_shape(mask, "padding_mask", {n});
        if (k < 1 || k > E) throw std::invalid_argument("top_k: expected 1 <= top_k <= E");
        auto logits = empty<T>({n, E}), pc = empty<T>({n, E}), p = empty<T>({n, E});
        auto ent = empty<T>({n}), wts = empty<T>({n, k});
        auto idx = empty<index_t>({n, k}), tpe = empty<index_t>({E});
        auto dropped = py::array_t<bool>(std::vector<py::ssize_t>{n, k});
        moe::RouterBuffers<T> b{logits.mutable_data(), pc.mutable_data(), p.mutable_data(),
                                ent.mutable_data(),    idx.mutable_data(), wts.mutable_data(),
                                reinterpret_cast<std::uint8_t*>(dropped.mutable_data()),
                                tpe.mutable_data()};
        const auto opt =
            router_options(k, normalize, ste, training, noise_std, seed, step, capacity_factor);
        moe::RouterLossValues L;
        {
          py::gil_scoped_release release;
          L = moe::router_forward<T>(x.data(), w.data(), mask.data(), n, D, E, opt, b);
        }
        py::dict out;
        out["router_logits"] = logits;
        out["router_probs_clean"] = pc;
        out["router_probs"] = p;
        out["entropy"] = ent;
        out["topk_indices"] = idx;
        out["topk_weights"] = wts;
        out["dropped"] = dropped;
        out["tokens_per_expert"] = tpe;
        py::dict losses;
        losses["load_balance"] = L.load_balance;
        losses["z_loss"] = L.z_loss;
        losses["entropy"] = L.entropy;
        out["losses"] = losses;
        return out;
      },
      py::arg("x"), py::arg("w_router"), py::arg("mask"), py::arg("top_k"),
      py::arg("normalize_topk"), py::arg("straight_through"), py::arg("training"),
      py::arg("noise_std"), py::arg("noise_seed"), py::arg("noise_step"),
      py::arg("capacity_factor"));

  m.def(
      ("router_backward" + sfx).c_str(),
      [](In<T> x, In<T> w, Mask mask, In<T> logits, In<T> probs_clean, In<T> probs,
         In<T> entropy, Idx idx, Mask dropped, Idx tpe, std::optional<In<T>> d_weights,
         index_t k, bool normalize, bool ste, bool training, double lb_coef, double z_coef,
         double ent_coef, py::array dx, py::array dw) {
        const index_t n = x.shape(0), D = x.shape(1), E = w.shape(1);
        expect_shape(w, "w_router", {D, E});
        expect_shape(mask, "padding_mask", {n});
        for (auto* a : {&logits, &probs_clean, &probs}) expect_shape(*a, "saved probs", {n, E});
        expect_shape(entropy, "saved entropy", {n});
        expect_shape(idx, "saved topk_indices", {n, k});
        expect_shape(dropped, "saved dropped", {n, k});
        expect_shape(tpe, "saved tokens_per_expert", {E});
        if (d_weights) expect_shape(*d_weights, "d_topk_weights", {n, k});
        T* dxp = inout<T>(dx, "dx", {n, D});
        T* dwp = inout<T>(dw, "dw_router", {D, E});
        moe::RouterBuffers<T> b{const_cast<T*>(logits.data()), const_cast<T*>(probs_clean.data()),
                                const_cast<T*>(probs.data()), const_cast<T*>(entropy.data()),
                                const_cast<index_t*>(idx.data()), nullptr,
                                const_cast<std::uint8_t*>(dropped.data()),
                                const_cast<index_t*>(tpe.data())};
        const auto opt = router_options(k, normalize, ste, training, 0.0, 0, 0, -1.0);
        const moe::RouterLossCoefs coefs{lb_coef, z_coef, ent_coef};
        const T* dwts = d_weights ? d_weights->data() : nullptr;
        py::gil_scoped_release release;
        moe::router_backward<T>(x.data(), w.data(), mask.data(), n, D, E, opt, coefs, b, dwts,
                                dxp, dwp);
      },
      py::arg("x"), py::arg("w_router"), py::arg("mask"), py::arg("router_logits"),
      py::arg("router_probs_clean"), py::arg("router_probs"), py::arg("entropy"),
      py::arg("topk_indices"), py::arg("dropped"), py::arg("tokens_per_expert"),
      py::arg("d_topk_weights"), py::arg("top_k"), py::arg("normalize_topk"),
      py::arg("straight_through"), py::arg("training"), py::arg("load_balance_coef"),
      py::arg("z_loss_coef"), py::arg("entropy_coef"), py::arg("dx"), py::arg("dw_router"));

  m.def(
      ("gather_rows" + sfx).c_str(),
      [](In<T> x, Idx row_token) {
        const index_t n = x.shape(0), d = x.shape(1), rows = row_token.shape(0);
        const index_t* rt = row_token.data();
        for (index_t r = 0; r < rows; ++r)
          if (rt[r] < 0 || rt[r] >= n) throw std::invalid_argument("row_token: out of range");
        auto xs = empty<T>({rows, d});
        T* out = xs.mutable_data();
        py::gil_scoped_release release;
        moe::gather_rows<T>(x.data(), rt, rows, d, out);
        return xs;
      },
      py::arg("x"), py::arg("row_token"));

  m.def(
      ("gather_rows_backward" + sfx).c_str(),
      [](In<T> dxs, Idx slot_row) {
        const index_t rows = dxs.shape(0), d = dxs.shape(1);
        const index_t n = slot_row.shape(0), k = slot_row.shape(1);
        const index_t* sr = slot_row.data();
        for (index_t i = 0; i < n * k; ++i)
          if (sr[i] >= rows) throw std::invalid_argument("slot_row: out of range");
        auto dx = empty<T>({n, d});
        T* out = dx.mutable_data();
        py::gil_scoped_release release;
        moe::gather_rows_backward<T>(dxs.data(), sr, n, k, d, out);
        return dx;
      },
      py::arg("dxs"), py::arg("slot_row"));

  m.def(
      ("combine_forward" + sfx).c_str(),
      [](In<T> ye, Idx slot_row, In<T> weights) {
        const index_t rows = ye.shape(0), d = ye.shape(1);
        const index_t n = slot_row.shape(0), k = slot_row.shape(1);
        expect_shape(weights, "topk_weights", {n, k});
        const index_t* sr = slot_row.data();
        for (index_t i = 0; i < n * k; ++i)
          if (sr[i] >= rows) throw std::invalid_argument("slot_row: out of range");
        auto y = empty<T>({n, d});
        T* out = y.mutable_data();
        py::gil_scoped_release release;
        moe::combine_forward<T>(ye.data(), sr, weights.data(), n, k, d, out);
        return y;
      },
      py::arg("ye"), py::arg("slot_row"), py::arg("topk_weights"));

  m.def(
      ("combine_backward" + sfx).c_str(),
      [](In<T> dy, In<T> ye, Idx slot_row, In<T> weights) {
        const index_t rows = ye.shape(0), d = ye.shape(1);
        const index_t n = slot_row.shape(0), k = slot_row.shape(1);
        expect_shape(dy, "dy", {n, d});
        expect_shape(weights, "topk_weights", {n, k});
        const index_t* sr = slot_row.data();
        for (index_t i = 0; i < n * k; ++i)
          if (sr[i] >= rows) throw std::invalid_argument("slot_row: out of range");
        auto dye = empty<T>({rows, d});
        auto dw = empty<T>({n, k});
        T *dyep = dye.mutable_data(), *dwp = dw.mutable_data();
        {
          py::gil_scoped_release release;
          moe::combine_backward<T>(dy.data(), ye.data(), sr, weights.data(), n, k, d, dyep, dwp);
        }
        return py::make_tuple(dye, dw);
      },
      py::arg("dy"), py::arg("ye"), py::arg("slot_row"), py::arg("topk_weights"));

  m.def(
      ("experts_forward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, In<T> w1, In<T> w3, In<T> w2, int activation) {
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = w1.shape(2);
        const moe::ExpertShape s{E, D, F, moe::Activation(activation)};
        const bool glu = s.act == moe::Activation::swiglu;
        expect_shape(w1, "w1", {E, D, F});
        if (glu) expect_shape(w3, "w3", {E, D, F});
        expect_shape(w2, "w2", {E, F, D});
        expect_shape(offsets, "offsets", {E + 1});
        if (offsets.data()[E] != N) throw std::invalid_argument("offsets: do not cover xs");
        auto h1 = empty<T>({N, F}), h3 = empty<T>({glu ? N : 0, F}), ye = empty<T>({N, D});
        T *h1p = h1.mutable_data(), *h3p = h3.mutable_data(), *yep = ye.mutable_data();
        {
          py::gil_scoped_release release;
          moe::experts_forward<T>(s, offsets.data(), xs.data(), w1.data(), w3.data(), w2.data(),
                                  h1p, h3p, yep);
        }
        return py::make_tuple(h1, h3, ye);
      },
      py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("activation"));

  m.def(
      ("experts_backward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, In<T> w1, In<T> w3, In<T> w2, In<T> h1, In<T> h3, In<T> dye,
         int activation, py::array dw1, py::array dw3, py::array dw2) {
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = w1.shape(2);
        const moe::ExpertShape s{E, D, F, moe::Activation(activation)};
        const bool glu = s.act == moe::Activation::swiglu;
        expect_shape(w1, "w1", {E, D, F});
        expect_shape(w2, "w2", {E, F, D});
        expect_shape(offsets, "offsets", {E + 1});
        expect_shape(h1, "saved h1", {N, F});
        expect_shape(dye, "dye", {N, D});
        if (offsets.data()[E] != N) throw std::invalid_argument("offsets: do not cover xs");
        T* dw1p = inout<T>(dw1, "dw1", {E, D, F});
        T* dw2p = inout<T>(dw2, "dw2", {E, F, D});
        T* dw3p = nullptr;
        if (glu) {
          expect_shape(w3, "w3", {E, D, F});
          expect_shape(h3, "saved h3", {N, F});
          dw3p = inout<T>(dw3, "dw3", {E, D, F});
        }
        auto dxs = empty<T>({N, D});
        T* dxsp = dxs.mutable_data();
        {
          py::gil_scoped_release release;
          moe::experts_backward<T>(s, offsets.data(), xs.data(), w1.data(), w3.data(), w2.data(),
                                   h1.data(), h3.data(), dye.data(), dxsp, dw1p, dw3p, dw2p);
        }
        return dxs;
      },
      py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("h1"), py::arg("h3"), py::arg("dye"), py::arg("activation"), py::arg("dw1"),
      py::arg("dw3"), py::arg("dw2"));

  m.def(
      ("linear_forward" + sfx).c_str(),
      [](In<T> x, In<T> w) {
        if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(0))
          throw std::invalid_argument("linear: expected x [n, in] and w [in, out]");
        const index_t n = x.shape(0), in = x.shape(1), out = w.shape(1);
        auto y = empty<T>({n, out});
        T* yp = y.mutable_data();
        py::gil_scoped_release release;
        moe::linear_forward<T>(x.data(), w.data(), n, in, out, yp);
        return y;
      },
      py::arg("x"), py::arg("w"));

  m.def(
      ("linear_backward" + sfx).c_str(),
      [](In<T> x, In<T> w, In<T> dy, py::array dw, bool need_dx) {
        const index_t n = x.shape(0), in = x.shape(1), out = w.shape(1);
        expect_shape(w, "w", {in, out});
        expect_shape(dy, "dy", {n, out});
        T* dwp = inout<T>(dw, "dw", {in, out});
        auto dx = empty<T>({need_dx ? n : 0, in});
        T* dxp = need_dx ? dx.mutable_data() : nullptr;
        py::gil_scoped_release release;
        moe::linear_backward<T>(x.data(), w.data(), dy.data(), n, in, out, dxp, dwp);
        return dx;
      },
      py::arg("x"), py::arg("w"), py::arg("dy"), py::arg("dw"), py::arg("need_dx") = true);

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
      py::arg("dout"), py::arg("ids"), py::arg("table_grad"));

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
      py::arg("x"), py::arg("g"), py::arg("eps"));

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
      py::arg("x"), py::arg("g"), py::arg("rstd"), py::arg("dy"), py::arg("dg"));

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
      py::arg("qkv"), py::arg("mask"), py::arg("heads"));

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
      py::arg("qkv"), py::arg("mask"), py::arg("probs"), py::arg("dout"), py::arg("heads"));

  m.def(
      ("cross_entropy" + sfx).c_str(),
      [](In<T> logits, Idx labels, index_t ignore_index) {
        if (logits.ndim() != 2) throw std::invalid_argument("logits: expected [N, V]");
        const index_t n = logits.shape(0), V = logits.shape(1);
        expect_shape(labels, "labels", {n});
        for (index_t t = 0; t < n; ++t) {
          const index_t l = labels.data()[t];
          if (l != ignore_index && (l < 0 || l >= V))
            throw std::invalid_argument("labels: expected values in [0, " + std::to_string(V) +
                                        ") or ignore_index, got " + std::to_string(l));
        }
        auto d = empty<T>({n, V});
        T* dp = d.mutable_data();
        double loss;
        {
          py::gil_scoped_release release;
          loss = moe::cross_entropy<T>(logits.data(), labels.data(), n, V, ignore_index, dp);
        }
        return py::make_tuple(loss, d);
      },
      py::arg("logits"), py::arg("labels"), py::arg("ignore_index"));

  m.def(
      ("adamw_step" + sfx).c_str(),
      [](py::array param, In<T> grad, py::array m1, py::array m2, double lr, double beta1,
         double beta2, double bias1, double bias2, double eps, double decay, double grad_scale) {
        const index_t n = param.size();
        T* p = writable<T>(param, "param");
        if (grad.size() != n) throw std::invalid_argument("grad: expected the size of param");
        T* mp = writable<T>(m1, "m");
        T* vp = writable<T>(m2, "v");
        if (m1.size() != n || m2.size() != n)
          throw std::invalid_argument("m, v: expected the size of param");
        const moe::AdamWStep s{lr, beta1, beta2, bias1, bias2, eps, decay, grad_scale};
        py::gil_scoped_release release;
        moe::adamw_step<T>(p, grad.data(), mp, vp, n, s);
      },
      py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("bias1"), py::arg("bias2"), py::arg("eps"),
      py::arg("decay"), py::arg("grad_scale"),
      "one AdamW update in place of param, m and v");

  m.def(
      ("sum_squares" + sfx).c_str(),
      [](In<T> g) {
        const T* gp = g.data();
        const index_t n = g.size();
        py::gil_scoped_release release;
        return moe::sum_squares<T>(gp, n);
      },
      py::arg("g"), "sum of g**2 in float64, in a fixed order");

  // C = A @ B through the GEMM path the kernels use (fixed row tiles, serial
  // BLAS per tile, our OpenMP threads): the benchmarks' SGEMM reference.
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
      py::arg("a"), py::arg("b"));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "moe_py C++ kernels (router, losses, dispatch/combine, experts)";
  moe::blas_init();

  m.def(
      "dispatch_plan",
      [](Idx topk_indices, Mask dropped, index_t E) {
        if (topk_indices.ndim() != 2) throw std::invalid_argument("topk_indices: expected 2-d");
        const index_t n = topk_indices.shape(0), k = topk_indices.shape(1);
        expect_shape(dropped, "dropped", {n, k});
        const index_t* idx = topk_indices.data();
        for (index_t i = 0; i < n * k; ++i)
          if (idx[i] < -1 || idx[i] >= E)
            throw std::invalid_argument("topk_indices: expected values in [-1, E)");
        auto offsets = empty<index_t>({E + 1});
        auto slot_row = empty<index_t>({n, k});
        std::vector<index_t> row_token(n * k);
        index_t N;
        {
          py::gil_scoped_release release;
          N = moe::dispatch_plan(idx, dropped.data(), n, k, E, offsets.mutable_data(),
                                 row_token.data(), slot_row.mutable_data());
        }
        auto rt = empty<index_t>({N});
        std::copy(row_token.begin(), row_token.begin() + N, rt.mutable_data());
        return py::make_tuple(offsets, rt, slot_row);
      },
      py::arg("topk_indices"), py::arg("dropped"), py::arg("num_experts"));

  m.def(
      "multi_token_labels",
      [](Idx targets, Mask mask, index_t n_heads, index_t ignore_index) {
        if (targets.ndim() != 2) throw std::invalid_argument("targets: expected [B, S]");
        const index_t B = targets.shape(0), S = targets.shape(1);
        expect_shape(mask, "mask", {B, S});
        if (n_heads < 1) throw std::invalid_argument("n_predict: expected >= 1");
        auto labels = empty<index_t>({n_heads, B, S});
        moe::multi_token_labels(targets.data(), mask.data(), B, S, n_heads, ignore_index,
                                labels.mutable_data());
        return labels;
      },
      py::arg("targets"), py::arg("mask"), py::arg("n_predict"), py::arg("ignore_index"));

  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("n: expected a positive number of threads");
    omp_set_num_threads(n);
  });
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
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
      py::arg("iters"), "FP32 FMA loop on every OpenMP thread: (flops done, checksum); time it");

  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}
