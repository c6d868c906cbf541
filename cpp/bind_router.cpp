// Bindings of cpp/router.h: routing forward and backward, and the row entropy the
// router computes (bound so that analysis and logging use the same code).
#include "bind_common.h"
#include "losses.h"
#include "router.h"

namespace moe_bind {

namespace {

moe::RouterOptions router_options(index_t k, bool normalize, bool ste, bool training,
                                  double noise_std, std::uint64_t seed, std::uint64_t step,
                                  double capacity_factor,
                                  moe::DropPolicy drop_policy = moe::DropPolicy::position) {
  moe::RouterOptions o;
  o.top_k = k;
  o.normalize_topk = normalize;
  o.straight_through = ste;
  o.training = training;
  o.noise_std = noise_std;
  o.noise_seed = seed;
  o.noise_step = step;
  o.capacity_factor = capacity_factor;
  o.drop_policy = drop_policy;
  return o;
}

// What router_forward returns: RouterOutput's fields in its order, then the unweighted losses.
struct RouterForwardResult {
  py::array topk_weights, topk_indices, router_probs, router_probs_clean, router_logits, entropy,
      tokens_per_expert, dropped;
  double load_balance, z_loss, entropy_loss;
};

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("router_forward" + sfx).c_str(),
      [](In<T> x, In<T> w, Mask mask, index_t k, bool normalize, bool ste, bool training,
         double noise_std, std::uint64_t seed, std::uint64_t step, double capacity_factor,
         moe::DropPolicy drop_policy) {
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
            router_options(k, normalize, ste, training, noise_std, seed, step, capacity_factor,
                           drop_policy);
        moe::RouterLossValues L;
        {
          py::gil_scoped_release release;
          L = moe::router_forward<T>(x.data(), w.data(), mask.data(), n, D, E, opt, b);
        }
        return RouterForwardResult{wts, idx, p, pc, logits, ent, tpe, dropped,
                                   L.load_balance, L.z_loss, L.entropy};
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w_router"), py::arg("mask"), py::arg("top_k"),
      py::arg("normalize_topk"), py::arg("straight_through"), py::arg("training"),
      py::arg("noise_std"), py::arg("noise_seed"), py::arg("noise_step"),
      py::arg("capacity_factor"), py::arg("drop_policy"),
      "route x [T, d_model]: logits, clean and noisy softmax, top-k, combine weights, capacity drops and the router losses");

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
        // The saved buffers index arrays: a changed one must not reach the kernel.
        for (index_t i = 0; i < n * k; ++i) {
          const index_t e = idx.data()[i];
          if (e < -1 || e >= E || (e == -1) != (mask.data()[i / k] == 0))
            throw std::invalid_argument(
                "saved topk_indices: expected experts in [0, E) for real tokens and -1 for "
                "padding; was the router output modified before backward?");
        }
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w_router"), py::arg("mask"), py::arg("router_logits"),
      py::arg("router_probs_clean"), py::arg("router_probs"), py::arg("entropy"),
      py::arg("topk_indices"), py::arg("dropped"), py::arg("tokens_per_expert"),
      py::arg("d_topk_weights"), py::arg("top_k"), py::arg("normalize_topk"),
      py::arg("straight_through"), py::arg("training"), py::arg("load_balance_coef"),
      py::arg("z_loss_coef"), py::arg("entropy_coef"), py::arg("dx"), py::arg("dw_router"),
      "add d(sum(d_topk_weights * topk_weights) + weighted aux losses) into dx and dw_router");

  m.def(
      ("row_entropy" + sfx).c_str(),
      [](In<T> probs) {
        if (probs.ndim() != 2) throw std::invalid_argument("probs: expected [T, E]");
        const index_t n = probs.shape(0), E = probs.shape(1);
        auto h = empty<T>({n});
        T* hp = h.mutable_data();
        const T* pp = probs.data();
        py::gil_scoped_release release;
        for (index_t t = 0; t < n; ++t) hp[t] = moe::entropy_row(pp + t * E, E);
        return h;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("probs"), "-sum p log p of each row in nats (the router's own entropy)");
}

}  // namespace

void bind_router(py::module_& m) {
  py::enum_<moe::DropPolicy>(m, "DropPolicy", "which assignments an expert over capacity drops")
      .value("position", moe::DropPolicy::position)
      .value("probs", moe::DropPolicy::probs);
  py::class_<RouterForwardResult>(m, "RouterForwardResult",
                                  "router_forward's buffers in RouterOutput's field order, then "
                                  "the unweighted load_balance, z_loss and entropy_loss")
      .def_readonly("topk_weights", &RouterForwardResult::topk_weights)
      .def_readonly("topk_indices", &RouterForwardResult::topk_indices)
      .def_readonly("router_probs", &RouterForwardResult::router_probs)
      .def_readonly("router_probs_clean", &RouterForwardResult::router_probs_clean)
      .def_readonly("router_logits", &RouterForwardResult::router_logits)
      .def_readonly("entropy", &RouterForwardResult::entropy)
      .def_readonly("tokens_per_expert", &RouterForwardResult::tokens_per_expert)
      .def_readonly("dropped", &RouterForwardResult::dropped)
      .def_readonly("load_balance", &RouterForwardResult::load_balance)
      .def_readonly("z_loss", &RouterForwardResult::z_loss)
      .def_readonly("entropy_loss", &RouterForwardResult::entropy_loss);
  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
