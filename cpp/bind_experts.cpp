// Bindings of cpp/experts.h: the expert FFNs, forward and backward.
#include "bind_common.h"
#include "experts.h"

#include <optional>
#include <string>
#include <type_traits>

namespace moe_bind {

namespace {

// The shape and activation of one call; clamped_swiglu's alpha and limit must be given,
// and only to it (MoEConfig holds their defaults: none here).
template <typename T>
moe::ExpertShape expert_shape(index_t E, index_t D, index_t F, moe::Activation act,
                              std::optional<double> alpha, std::optional<double> limit, bool bf16) {
  moe::ExpertShape s{E, D, F, act};
  if (bf16 && !std::is_same_v<T, float>)
    throw std::invalid_argument("bf16: bfloat16 compute needs float32 inputs and weights");
  s.bf16 = bf16;
  const bool clamped = act == moe::Activation::clamped_swiglu;
  if (clamped != alpha.has_value() || clamped != limit.has_value())
    throw std::invalid_argument(
        "swiglu_alpha, swiglu_limit: expected both for clamped_swiglu and neither otherwise");
  if (clamped) {
    s.alpha = *alpha;
    s.limit = *limit;
  }
  return s;
}

// Biases are all there (b3 only when gated) or all absent: a partial set is a caller's bug.
template <typename A>
void expect_bias_set(const std::optional<A>& b1, const std::optional<A>& b3,
                     const std::optional<A>& b2, bool glu, const char* names) {
  const bool any = b1 || b3 || b2;
  if (any && !(b1 && b2 && bool(b3) == glu))
    throw std::invalid_argument(std::string(names) +
                                ": expected all (the third only for a gated activation) or none");
}

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("experts_forward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, In<T> w1, In<T> w3, In<T> w2, moe::Activation activation,
         std::optional<double> swiglu_alpha, std::optional<double> swiglu_limit,
         std::optional<In<T>> b1, std::optional<In<T>> b3, std::optional<In<T>> b2, bool bf16) {
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = w1.shape(2);
        const moe::ExpertShape s = expert_shape<T>(E, D, F, activation, swiglu_alpha, swiglu_limit, bf16);
        const bool glu = moe::gated(s.act);
        expect_shape(w1, "w1", {E, D, F});
        if (glu) expect_shape(w3, "w3", {E, D, F});
        expect_shape(w2, "w2", {E, F, D});
        expect_shape(offsets, "offsets", {E + 1});
        if (offsets.data()[E] != N) throw std::invalid_argument("offsets: do not cover xs");
        expect_bias_set(b1, b3, b2, glu, "b1, b3, b2");
        moe::ExpertBiases<T> bias;
        if (b1) {
          expect_shape(*b1, "b1", {E, F});
          expect_shape(*b2, "b2", {E, D});
          bias.b1 = b1->data();
          bias.b2 = b2->data();
          if (glu) {
            expect_shape(*b3, "b3", {E, F});
            bias.b3 = b3->data();
          }
        }
        auto h1 = empty<T>({N, F}), h3 = empty<T>({glu ? N : 0, F}), ye = empty<T>({N, D});
        T *h1p = h1.mutable_data(), *h3p = h3.mutable_data(), *yep = ye.mutable_data();
        {
          py::gil_scoped_release release;
          moe::experts_forward<T>(s, offsets.data(), xs.data(), w1.data(), w3.data(), w2.data(),
                                  bias, h1p, h3p, yep);
        }
        return py::make_tuple(h1, h3, ye);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("activation"), py::arg("swiglu_alpha") = py::none(),
      py::arg("swiglu_limit") = py::none(), py::arg("b1") = py::none(), py::arg("b3") = py::none(),
      py::arg("b2") = py::none(), py::arg("bf16") = false,
      "every expert's FFN on its rows of xs (biases b1, b3, b2: all or none); returns "
      "(h1, h3, ye), h1/h3 saved for backward. bf16 (float32 only): the GEMMs read "
      "bfloat16-rounded operands, the weights given rounded already");

  m.def(
      ("experts_backward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, In<T> w1, In<T> w3, In<T> w2, In<T> h1, In<T> h3, In<T> dye,
         moe::Activation activation, py::array dw1, py::array dw3, py::array dw2,
         const std::string& path, std::optional<double> swiglu_alpha,
         std::optional<double> swiglu_limit, std::optional<py::array> db1,
         std::optional<py::array> db3, std::optional<py::array> db2, bool bf16) {
        const auto p = path == "auto"        ? moe::BackwardPath::automatic
                       : path == "by_expert" ? moe::BackwardPath::by_expert
                       : path == "two_phase" ? moe::BackwardPath::two_phase
                                             : throw std::invalid_argument(
                                                   "path: expected 'auto', 'by_expert' or "
                                                   "'two_phase', got '" + path + "'");
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = w1.shape(2);
        const moe::ExpertShape s = expert_shape<T>(E, D, F, activation, swiglu_alpha, swiglu_limit, bf16);
        const bool glu = moe::gated(s.act);
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
        expect_bias_set(db1, db3, db2, glu, "db1, db3, db2");
        moe::ExpertBiasGrads<T> dbias;
        if (db1) {
          dbias.db1 = inout<T>(*db1, "db1", {E, F});
          dbias.db2 = inout<T>(*db2, "db2", {E, D});
          if (glu) dbias.db3 = inout<T>(*db3, "db3", {E, F});
        }
        auto dxs = empty<T>({N, D});
        T* dxsp = dxs.mutable_data();
        {
          py::gil_scoped_release release;
          moe::experts_backward<T>(s, offsets.data(), xs.data(), w1.data(), w3.data(), w2.data(),
                                   h1.data(), h3.data(), dye.data(), dxsp, dw1p, dw3p, dw2p,
                                   dbias, p);
        }
        return dxs;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("h1"), py::arg("h3"), py::arg("dye"), py::arg("activation"), py::arg("dw1"),
      py::arg("dw3"), py::arg("dw2"), py::arg("path") = "auto",
      py::arg("swiglu_alpha") = py::none(), py::arg("swiglu_limit") = py::none(),
      py::arg("db1") = py::none(), py::arg("db3") = py::none(), py::arg("db2") = py::none(),
      py::arg("bf16") = false,
      "dxs from dye; adds the weight gradients into dw1, dw3, dw2 and, for experts with "
      "biases, db1, db3, db2 (path: 'auto', or "
      "'by_expert' / 'two_phase' to force one walk; both give the same bits)");
}

}  // namespace

void bind_experts(py::module_& m) {
  py::enum_<moe::Activation>(m, "Activation", "the expert FFN's activation")
      .value("swiglu", moe::Activation::swiglu)
      .value("gelu", moe::Activation::gelu)
      .value("clamped_swiglu", moe::Activation::clamped_swiglu);
  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
