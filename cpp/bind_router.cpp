// Bindings of cpp/router.h: routing options, forward and backward, and the row entropy the
// router computes (bound so that analysis and logging use the same code).
#include <cmath>

#include "bind_common.h"
#include "losses.h"
#include "router.h"

namespace moe_bind {

namespace {

// What router_forward returns: RouterOutput's fields in its order, then the unweighted losses.
struct RouterForwardResult {
  py::array topk_weights, topk_indices, router_probs, router_probs_clean, router_logits, entropy,
      tokens_per_expert, dropped;
  double load_balance, z_loss, entropy_loss;
};

// Options that would index out of bounds or divide by zero never reach the kernels.
void check_options(const moe::RouterOptions& o, index_t n, index_t E) {
  if (o.top_k < 1 || o.top_k > E) throw std::invalid_argument("top_k: expected 1 <= top_k <= E");
  if (o.n_group < 1 || E % o.n_group != 0)
    throw std::invalid_argument("n_group: expected a divisor of num_experts");
  if (o.n_group > 1 && (o.topk_group < 1 || o.topk_group > o.n_group ||
                        o.top_k > o.topk_group * (E / o.n_group)))
    throw std::invalid_argument(
        "topk_group: expected 1 <= topk_group <= n_group with top_k <= topk_group * E / n_group");
  if (o.sinkhorn_iterations < 1)
    throw std::invalid_argument("sinkhorn_iterations: expected >= 1");
  if (o.seq_len < 0 || (o.seq_len > 0 && n % o.seq_len != 0))
    throw std::invalid_argument("seq_len: expected 0 or a divisor of the token count");
  if (o.kind == moe::RouterKind::expert_choice && !(o.capacity_factor > 0))
    throw std::invalid_argument("capacity_factor: expert choice needs a factor > 0");
  if (!(o.topk_norm_min >= 0) || !std::isfinite(o.topk_norm_min))
    throw std::invalid_argument("topk_norm_min: expected a finite number >= 0");
}

template <typename T>
const T* optional_row(const std::optional<In<T>>& a, const char* name, index_t len) {
  if (!a) return nullptr;
  expect_shape(*a, name, {len});
  return a->data();
}

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("router_forward" + sfx).c_str(),
      [](In<T> x, std::optional<In<T>> w, Mask mask, index_t E, const moe::RouterOptions& opt,
         std::optional<In<T>> expert_bias, std::optional<Idx> balance_counts,
         std::optional<Idx> token_ids, std::optional<Idx> forced_indices,
         std::optional<Mask> expert_mask, std::optional<In<T>> b_router) {
        if (x.ndim() != 2) throw std::invalid_argument("x: expected a 2-d array");
        const index_t n = x.shape(0), D = x.shape(1);
        const bool hash = opt.kind == moe::RouterKind::hash;
        if (!hash && !w) throw std::invalid_argument("w_router: required by this router");
        if (w) expect_shape(*w, "w_router", {D, E});
        if (b_router && !w) throw std::invalid_argument("b_router: this router has no w_router");
        expect_shape(mask, "padding_mask", {n});
        check_options(opt, n, E);
        const index_t* ids = optional_row(token_ids, "token_ids", n);
        if (hash && !ids) throw std::invalid_argument("token_ids: required by the hash router");
        if (ids)
          for (index_t t = 0; t < n; ++t)
            if (ids[t] < 0) throw std::invalid_argument("token_ids: expected ids >= 0");
        const index_t* extra = optional_row(balance_counts, "balance_counts", E);
        if (extra)
          for (index_t e = 0; e < E; ++e)
            if (extra[e] < 0) throw std::invalid_argument("balance_counts: expected counts >= 0");
        const index_t* forced = nullptr;
        if (forced_indices) {
          if (opt.kind == moe::RouterKind::expert_choice)
            throw std::invalid_argument("forced_indices: expert choice picks tokens, not experts");
          expect_shape(*forced_indices, "forced_indices", {n, opt.top_k});
          forced = forced_indices->data();
          for (index_t t = 0; t < n; ++t)
            for (index_t j = 0; j < opt.top_k && mask.data()[t]; ++j)
              if (forced[t * opt.top_k + j] < 0 || forced[t * opt.top_k + j] >= E)
                throw std::invalid_argument("forced_indices: expected experts in [0, E) for real tokens");
        }
        const std::uint8_t* available = nullptr;
        if (expert_mask) {
          if (opt.kind == moe::RouterKind::expert_choice)
            throw std::invalid_argument("expert_mask: expert choice picks tokens, not experts");
          expect_shape(*expert_mask, "expert_mask", {E});
          available = expert_mask->data();
          index_t left = 0;
          for (index_t e = 0; e < E; ++e) left += available[e] ? 1 : 0;
          if (left < opt.top_k) throw std::invalid_argument("expert_mask: fewer experts left than top_k");
        }
        // expert choice writes up to E slots per token and trims to the largest count
        const index_t room = opt.kind == moe::RouterKind::expert_choice ? E : opt.top_k;
        auto logits = empty<T>({n, E}), pc = empty<T>({n, E}), p = empty<T>({n, E});
        auto ent = empty<T>({n}), wts = empty<T>({n, room});
        auto idx = empty<index_t>({n, room}), tpe = empty<index_t>({E});
        auto dropped = py::array_t<bool>(std::vector<py::ssize_t>{n, room});
        moe::RouterBuffers<T> b{logits.mutable_data(), pc.mutable_data(), p.mutable_data(),
                                ent.mutable_data(),    idx.mutable_data(), wts.mutable_data(),
                                reinterpret_cast<std::uint8_t*>(dropped.mutable_data()),
                                tpe.mutable_data()};
        const moe::RouterInputs<T> in{x.data(),
                                      w ? w->data() : nullptr,
                                      optional_row(b_router, "b_router", E),
                                      mask.data(),
                                      optional_row(expert_bias, "expert_bias", E),
                                      extra,
                                      ids,
                                      forced,
                                      available};
        moe::RouterLossValues L;
        {
          py::gil_scoped_release release;
          L = moe::router_forward<T>(in, n, D, E, opt, b);
        }
        py::object wts_out = wts, idx_out = idx, dropped_out = dropped;
        if (L.width != room) {  // the slots were written with stride width: keep those
          const index_t used = n * L.width;
          auto trim = [&](auto& a, auto tag) {
            using V = decltype(tag);
            auto out = py::array_t<V>(std::vector<py::ssize_t>{n, L.width});
            std::copy(a.data(), a.data() + used, out.mutable_data());
            return out;
          };
          wts_out = trim(wts, T());
          idx_out = trim(idx, index_t());
          dropped_out = trim(dropped, bool());
        }
        return RouterForwardResult{wts_out, idx_out, p, pc, logits, ent, tpe, dropped_out,
                                   L.load_balance, L.z_loss, L.entropy};
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w_router"),
      py::arg("mask"), py::arg("num_experts"), py::arg("options"), py::arg("expert_bias"),
      py::arg("balance_counts"), py::arg("token_ids"), py::arg("forced_indices") = py::none(),
      py::arg("expert_mask") = py::none(), py::arg("b_router") = py::none(),
      "route x [T, d_model] with the algorithm of options.kind: logits (x @ w_router + "
      "b_router), clean and noisy scores, the selection (or forced_indices; never an "
      "expert_mask 0 expert), combine weights, capacity drops and the router losses");

  m.def(
      ("router_backward" + sfx).c_str(),
      [](In<T> x, In<T> w, Mask mask, In<T> logits, In<T> probs_clean, In<T> probs,
         In<T> entropy, Idx idx, Mask dropped, Idx tpe, std::optional<In<T>> d_weights,
         moe::RouterOptions opt, std::optional<Idx> balance_counts, double lb_coef,
         double z_coef, double ent_coef, py::array dx, py::array dw,
         std::optional<py::array> db) {
        const index_t n = x.shape(0), D = x.shape(1), E = w.shape(1);
        expect_shape(w, "w_router", {D, E});
        expect_shape(mask, "padding_mask", {n});
        if (idx.ndim() != 2 || idx.shape(0) != n)
          throw std::invalid_argument("saved topk_indices: expected shape (T, slots)");
        const index_t k = idx.shape(1);  // the forward's width
        for (auto* a : {&logits, &probs_clean, &probs}) expect_shape(*a, "saved probs", {n, E});
        expect_shape(entropy, "saved entropy", {n});
        expect_shape(dropped, "saved dropped", {n, k});
        expect_shape(tpe, "saved tokens_per_expert", {E});
        if (d_weights) expect_shape(*d_weights, "d_topk_weights", {n, k});
        const bool ec = opt.kind == moe::RouterKind::expert_choice;
        if (!ec && k != opt.top_k)
          throw std::invalid_argument("saved topk_indices: expected top_k slots per token");
        check_options(opt, n, E);
        // The saved buffers index arrays: a changed one must not reach the kernel.
        for (index_t i = 0; i < n * k; ++i) {
          const index_t e = idx.data()[i];
          const bool real = mask.data()[i / k] != 0;
          if (e < -1 || e >= E || (e == -1 && real && !ec) || (e != -1 && !real))
            throw std::invalid_argument(
                "saved topk_indices: expected experts in [0, E) for real tokens and -1 for "
                "padding; was the router output modified before backward?");
        }
        T* dxp = inout<T>(dx, "dx", {n, D});
        T* dwp = inout<T>(dw, "dw_router", {D, E});
        T* dbp = db ? inout<T>(*db, "db_router", {E}) : nullptr;
        moe::RouterBuffers<T> b{const_cast<T*>(logits.data()), const_cast<T*>(probs_clean.data()),
                                const_cast<T*>(probs.data()), const_cast<T*>(entropy.data()),
                                const_cast<index_t*>(idx.data()), nullptr,
                                const_cast<std::uint8_t*>(dropped.data()),
                                const_cast<index_t*>(tpe.data())};
        opt.top_k = k;
        // the backward reads the saved logits: neither bias is needed again
        const moe::RouterInputs<T> in{x.data(),
                                      w.data(),
                                      nullptr,
                                      mask.data(),
                                      nullptr,
                                      optional_row(balance_counts, "balance_counts", E),
                                      nullptr,
                                      nullptr,
                                      nullptr};
        const moe::RouterLossCoefs coefs{lb_coef, z_coef, ent_coef};
        const T* dwts = d_weights ? d_weights->data() : nullptr;
        py::gil_scoped_release release;
        moe::router_backward<T>(in, n, D, E, opt, coefs, b, dwts, dxp, dwp, dbp);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("w_router"),
      py::arg("mask"), py::arg("router_logits"), py::arg("router_probs_clean"),
      py::arg("router_probs"), py::arg("entropy"), py::arg("topk_indices"), py::arg("dropped"),
      py::arg("tokens_per_expert"), py::arg("d_topk_weights"), py::arg("options"),
      py::arg("balance_counts"), py::arg("load_balance_coef"), py::arg("z_loss_coef"),
      py::arg("entropy_coef"), py::arg("dx"), py::arg("dw_router"),
      py::arg("db_router") = py::none(),
      "add d(sum(d_topk_weights * topk_weights) + weighted aux losses) into dx, dw_router and "
      "(a router with a bias) db_router");

  m.def(
      ("balance_distribution" + sfx).c_str(),
      [](In<T> probs, Mask mask, moe::RouterKind kind) {
        if (probs.ndim() != 2) throw std::invalid_argument("probs: expected [T, E]");
        const index_t n = probs.shape(0), E = probs.shape(1);
        expect_shape(mask, "padding_mask", {n});
        auto out = empty<T>({n, E});
        std::vector<T> scratch;
        py::gil_scoped_release release;
        const T* d = moe::balance_dist<T>(kind, probs.data(), mask.data(), n, E, scratch);
        std::copy(d, d + n * E, out.mutable_data());
        return out;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("probs"), py::arg("mask"),
      py::arg("kind"),
      "the distribution the load-balance loss averages: probs, or per-expert scores (sigmoid, "
      "sqrt-softplus) normalised per real token");

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
  m.def(
      "load_balance_of_sums",
      [](Idx counts, py::array_t<double, py::array::c_style | py::array::forcecast> prob_sums,
         index_t real) {
        if (counts.ndim() != 1) throw std::invalid_argument("counts: expected [E]");
        const index_t E = counts.shape(0);
        expect_shape(prob_sums, "prob_sums", {E});
        if (real < 0) throw std::invalid_argument("real: expected >= 0");
        for (index_t e = 0; e < E; ++e)
          if (counts.data()[e] < 0) throw std::invalid_argument("counts: expected counts >= 0");
        return moe::load_balance_of_sums(counts.data(), prob_sums.data(), real, E);
      },
      py::kw_only(), py::arg("counts"), py::arg("prob_sums"), py::arg("real"),
      "the batch-scope load balance E * sum_e f_e * prob_sums[e] / real, f from the counts "
      "(the router kernel's own formula, for sums gathered over processes)");

  py::enum_<moe::DropPolicy>(m, "DropPolicy", "which assignments an expert over capacity drops")
      .value("position", moe::DropPolicy::position)
      .value("probs", moe::DropPolicy::probs);
  py::enum_<moe::RouterKind>(m, "RouterKind", "the routing algorithm")
      .value("softmax_topk", moe::RouterKind::softmax_topk)
      .value("sigmoid_topk", moe::RouterKind::sigmoid_topk)
      .value("expert_choice", moe::RouterKind::expert_choice)
      .value("sinkhorn", moe::RouterKind::sinkhorn)
      .value("hash", moe::RouterKind::hash)
      .value("sqrtsoftplus_topk", moe::RouterKind::sqrtsoftplus_topk);
  py::enum_<moe::GroupScore>(m, "GroupScore", "a group's score in group-limited top-k")
      .value("top2_sum", moe::GroupScore::top2_sum)
      .value("max", moe::GroupScore::max);
  using O = moe::RouterOptions;
  py::class_<O>(m, "RouterOptions", "the routing options of cpp/router.h, field by field")
      .def(py::init<>())
      .def_readwrite("kind", &O::kind, "the routing algorithm")
      .def_readwrite("top_k", &O::top_k, "k")
      .def_readwrite("normalize_topk", &O::normalize_topk, "divide the k weights by their sum")
      .def_readwrite("straight_through", &O::straight_through, "weights 1 in training")
      .def_readwrite("training", &O::training, "training-mode routing")
      .def_readwrite("noise_std", &O::noise_std, "std of the logit noise (0: none)")
      .def_readwrite("noise_seed", &O::noise_seed, "seed of the noise")
      .def_readwrite("noise_step", &O::noise_step, "step of the noise")
      .def_readwrite("noise_token_offset", &O::noise_token_offset,
                     "noise counter index of row 0 (a rank's first row in the global batch)")
      .def_readwrite("capacity_factor", &O::capacity_factor, "< 0: dropless")
      .def_readwrite("drop_policy", &O::drop_policy, "which assignments over capacity drop")
      .def_readwrite("routed_scaling_factor", &O::routed_scaling_factor, "weight multiplier")
      .def_readwrite("topk_norm_min", &O::topk_norm_min,
                     "floor of the normalised weights' denominator (0: none)")
      .def_readwrite("n_group", &O::n_group, "expert groups of grouped top-k")
      .def_readwrite("topk_group", &O::topk_group, "eligible groups of grouped top-k")
      .def_readwrite("group_score", &O::group_score, "a group's score in grouped top-k")
      .def_readwrite("sinkhorn_iterations", &O::sinkhorn_iterations, "most Sinkhorn sweeps")
      .def_readwrite("sinkhorn_tolerance", &O::sinkhorn_tolerance, "Sinkhorn stopping change")
      .def_readwrite("hash_seed", &O::hash_seed, "seed of the hash router")
      .def_readwrite("seq_len", &O::seq_len, "> 0: sequence-scope balance loss");
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
