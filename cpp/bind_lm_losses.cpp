// Bindings of cpp/lm_losses.h: cross-entropy and the multi-token labels.
#include "bind_common.h"
#include "lm_losses.h"

namespace moe_bind {

namespace {

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("logits"), py::arg("labels"), py::arg("ignore_index"),
      "mean cross-entropy over labels != ignore_index, and d loss / d logits");
}

}  // namespace

void bind_lm_losses(py::module_& m) {
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("targets"), py::arg("mask"), py::arg("n_predict"), py::arg("ignore_index"),
      "labels [n_predict, B, S] of heads predicting t+1 ... t+n_predict, padding ignored");

  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
