// Bindings of cpp/experts.h: the expert FFNs, forward and backward.
#include "bind_common.h"
#include "experts.h"

#include <cstdint>
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

// Whether a is an expert stack the kernels read in place (moe::Stack): dtype T, [E, rows,
// cols], each expert's matrix C-contiguous, the experts a whole number of elements apart and
// not overlapping. The halves of transformers' gate_up_proj are such views.
template <typename T>
bool stacked(const py::array& a, index_t rows, index_t cols) {
  if (!py::isinstance<py::array_t<T>>(a) || a.ndim() != 3) return false;
  const py::ssize_t item = sizeof(T), s0 = a.strides(0);
  const bool inner = (cols <= 1 || a.strides(2) == item) && (rows <= 1 || a.strides(1) == cols * item);
  const bool apart = a.shape(0) <= 1 || (s0 % item == 0 && s0 >= rows * cols * item);
  return inner && apart && reinterpret_cast<std::uintptr_t>(a.data()) % alignof(T) == 0;
}

index_t stack_stride(const py::array& a, index_t rows, index_t cols) {
  return a.shape(0) <= 1 ? rows * cols : index_t(a.strides(0) / py::ssize_t(a.itemsize()));
}

// Expert weights [E, rows, cols], read in place when stacked, else converted (as In<T>
// converts); `keep` holds what the stack points into.
template <typename T>
moe::Stack<const T> weight_stack(py::array& keep, const char* name, index_t E, index_t rows,
                                 index_t cols) {
  if (!stacked<T>(keep, rows, cols)) keep = In<T>::ensure(keep);
  if (!keep) throw std::invalid_argument(std::string(name) + ": expected a float array");
  expect_shape(keep, name, {E, rows, cols});
  return {static_cast<const T*>(keep.data()), stack_stride(keep, rows, cols)};
}

// A weight-gradient buffer [E, rows, cols] the kernel adds into: the caller's own writable
// stacked array (no silent copy).
template <typename T>
moe::Stack<T> gradient_stack(py::array& a, const char* name, index_t E, index_t rows, index_t cols) {
  expect_shape(a, name, {E, rows, cols});
  if (!stacked<T>(a, rows, cols) || !a.writeable())
    throw std::invalid_argument(std::string(name) + ": expected a writable array of the layer "
                                "dtype, each expert's matrix C-contiguous");
  return {static_cast<T*>(a.mutable_data()), stack_stride(a, rows, cols)};
}

// [rows, cols] of w1 (and w3) and of w2 per expert, in the layout `linear` says.
struct WeightDims {
  index_t r1, c1, r2, c2;
};
WeightDims weight_dims(index_t D, index_t F, bool linear) {
  return linear ? WeightDims{F, D, D, F} : WeightDims{D, F, F, D};
}

// d_ff from w1, whose shape is [E, d_model, d_ff] or, linear, [E, d_ff, d_model].
index_t d_ff_of(const py::array& w1, bool linear) {
  if (w1.ndim() != 3) throw std::invalid_argument("w1: expected [E, rows, cols]");
  return w1.shape(linear ? 1 : 2);
}

// The packs a call was given (or none): made for this direction, shape, layout and
// activation, and given under bf16 compute.
void check_packed(const moe::PackedExpertWeights* p, const moe::ExpertShape& s, bool backward) {
  if (!p) return;
  if (!s.bf16) throw std::invalid_argument("packed: given without bf16");
  if (p->backward != backward)
    throw std::invalid_argument(backward ? "packed: a forward's packs given to a backward"
                                         : "packed: a backward's packs given to a forward");
  if (p->E != s.E || p->d_model != s.d_model || p->d_ff != s.d_ff || p->linear != s.linear ||
      p->gated != moe::gated(s.act))
    throw std::invalid_argument("packed: made for other weights (shape, layout or activation)");
}

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
  m.def(
      ("experts_forward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, py::array w1, py::array w3, py::array w2, moe::Activation activation,
         std::optional<double> swiglu_alpha, std::optional<double> swiglu_limit,
         std::optional<In<T>> b1, std::optional<In<T>> b3, std::optional<In<T>> b2, bool bf16,
         bool linear, std::optional<const moe::PackedExpertWeights*> given) {
        const moe::PackedExpertWeights* packed = given.value_or(nullptr);
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = d_ff_of(w1, linear);
        moe::ExpertShape s = expert_shape<T>(E, D, F, activation, swiglu_alpha, swiglu_limit, bf16);
        s.linear = linear;
        const bool glu = moe::gated(s.act);
        const WeightDims wd = weight_dims(D, F, linear);
        moe::ExpertWeights<T> w;
        w.w1 = weight_stack<T>(w1, "w1", E, wd.r1, wd.c1);
        if (glu) w.w3 = weight_stack<T>(w3, "w3", E, wd.r1, wd.c1);
        w.w2 = weight_stack<T>(w2, "w2", E, wd.r2, wd.c2);
        expect_shape(offsets, "offsets", {E + 1});
        if (offsets.data()[E] != N) throw std::invalid_argument("offsets: do not cover xs");
        check_packed(packed, s, false);
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
          moe::experts_forward<T>(s, offsets.data(), xs.data(), w, bias, h1p, h3p, yep, packed);
        }
        return py::make_tuple(h1, h3, ye);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("activation"), py::arg("swiglu_alpha") = py::none(),
      py::arg("swiglu_limit") = py::none(), py::arg("b1") = py::none(), py::arg("b3") = py::none(),
      py::arg("b2") = py::none(), py::arg("bf16") = false, py::arg("linear") = false,
      py::arg("packed") = py::none(),
      "every expert's FFN on its rows of xs (biases b1, b3, b2: all or none); returns "
      "(h1, h3, ye), h1/h3 saved for backward. bf16 (float32 only): the GEMMs read "
      "bfloat16-rounded operands, the weights given rounded already on the fallback kernel; "
      "packed: the weights' forward packs (pack_expert_weights), whose kernel runs the call. "
      "linear: the weights are nn.Linear's [E, out, in] (w1, w3 [E, d_ff, d_model], w2 "
      "[E, d_model, d_ff]); each expert's matrix must be C-contiguous, the experts may lie apart");

  m.def(
      ("experts_backward" + sfx).c_str(),
      [](In<T> xs, Idx offsets, py::array w1, py::array w3, py::array w2, In<T> h1, In<T> h3,
         In<T> dye, moe::Activation activation, py::array dw1, py::array dw3, py::array dw2,
         const std::string& path, std::optional<double> swiglu_alpha,
         std::optional<double> swiglu_limit, std::optional<py::array> db1,
         std::optional<py::array> db3, std::optional<py::array> db2, bool bf16, bool linear,
         std::optional<const moe::PackedExpertWeights*> given, bool accumulate) {
        const moe::PackedExpertWeights* packed = given.value_or(nullptr);
        const auto p = path == "auto"        ? moe::BackwardPath::automatic
                       : path == "by_expert" ? moe::BackwardPath::by_expert
                       : path == "two_phase" ? moe::BackwardPath::two_phase
                                             : throw std::invalid_argument(
                                                   "path: expected 'auto', 'by_expert' or "
                                                   "'two_phase', got '" + path + "'");
        const index_t N = xs.shape(0), D = xs.shape(1), E = w1.shape(0), F = d_ff_of(w1, linear);
        moe::ExpertShape s = expert_shape<T>(E, D, F, activation, swiglu_alpha, swiglu_limit, bf16);
        s.linear = linear;
        const bool glu = moe::gated(s.act);
        const WeightDims wd = weight_dims(D, F, linear);
        moe::ExpertWeights<T> w;
        moe::ExpertWeightGrads<T> dw;
        w.w1 = weight_stack<T>(w1, "w1", E, wd.r1, wd.c1);
        w.w2 = weight_stack<T>(w2, "w2", E, wd.r2, wd.c2);
        expect_shape(offsets, "offsets", {E + 1});
        expect_shape(h1, "saved h1", {N, F});
        expect_shape(dye, "dye", {N, D});
        if (offsets.data()[E] != N) throw std::invalid_argument("offsets: do not cover xs");
        check_packed(packed, s, true);
        dw.dw1 = gradient_stack<T>(dw1, "dw1", E, wd.r1, wd.c1);
        dw.dw2 = gradient_stack<T>(dw2, "dw2", E, wd.r2, wd.c2);
        if (glu) {
          w.w3 = weight_stack<T>(w3, "w3", E, wd.r1, wd.c1);
          expect_shape(h3, "saved h3", {N, F});
          dw.dw3 = gradient_stack<T>(dw3, "dw3", E, wd.r1, wd.c1);
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
          moe::experts_backward<T>(s, offsets.data(), xs.data(), w, h1.data(), h3.data(),
                                   dye.data(), dxsp, dw, dbias, p, packed, accumulate);
        }
        return dxs;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("xs"), py::arg("offsets"), py::arg("w1"), py::arg("w3"), py::arg("w2"),
      py::arg("h1"), py::arg("h3"), py::arg("dye"), py::arg("activation"), py::arg("dw1"),
      py::arg("dw3"), py::arg("dw2"), py::arg("path") = "auto",
      py::arg("swiglu_alpha") = py::none(), py::arg("swiglu_limit") = py::none(),
      py::arg("db1") = py::none(), py::arg("db3") = py::none(), py::arg("db2") = py::none(),
      py::arg("bf16") = false, py::arg("linear") = false, py::arg("packed") = py::none(),
      py::arg("accumulate") = true,
      "dxs from dye; adds the weight gradients into dw1, dw3, dw2 (in the weights' layout: "
      "linear as in experts_forward) and, for experts with biases, db1, db3, db2 (path: "
      "'auto', or 'by_expert' / 'two_phase' to force one walk; both give the same bits). "
      "packed: the weights' backward packs, as in experts_forward. accumulate False: the "
      "gradients are written into dw1 ... db2 instead, whatever they held");
}

void bind_packed_class(py::module_& m) {
  using P = moe::PackedExpertWeights;
  py::class_<P>(m, "PackedExpertWeights",
                "expert weights packed for a bfloat16 kernel (pack_expert_weights)")
      .def_property_readonly("kernel", [](const P& p) { return std::string(moe::bf16_kernel_name(p.kernel)); })
      .def_readonly("backward", &P::backward)
      .def_property_readonly("nbytes", [](const P& p) { return 4 * (p.offset2 + p.E * p.stride2); });
}

void bind_packing(py::module_& m) {
  m.def(
      "pack_expert_weights",
      [](py::array w1, py::array w3, py::array w2, moe::Activation activation, bool linear,
         bool backward, std::optional<std::string> kernel) {
        const index_t E = w1.shape(0), F = d_ff_of(w1, linear), D = w1.shape(linear ? 2 : 1);
        moe::ExpertShape s{E, D, F, activation};
        s.linear = linear;
        s.bf16 = true;
        s.bf16_kernel = kernel ? kernel_named(*kernel) : moe::bf16_kernel();
        if (!moe::bf16_kernel_available(s.bf16_kernel))
          throw std::invalid_argument(std::string("kernel: '") + moe::bf16_kernel_name(s.bf16_kernel) +
                                      "' does not run on this CPU");
        const WeightDims wd = weight_dims(D, F, linear);
        moe::ExpertWeights<float> w;
        w.w1 = weight_stack<float>(w1, "w1", E, wd.r1, wd.c1);
        if (moe::gated(activation)) w.w3 = weight_stack<float>(w3, "w3", E, wd.r1, wd.c1);
        w.w2 = weight_stack<float>(w2, "w2", E, wd.r2, wd.c2);
        py::gil_scoped_release release;
        return moe::pack_expert_weights(s, w, backward);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("w1"), py::arg("w3"),
      py::arg("w2"), py::arg("activation"), py::arg("linear") = false, py::arg("backward") = false,
      py::arg("kernel") = py::none(),
      "float32 expert weights (as experts_forward takes them) packed for a bfloat16 kernel "
      "(default: the one in use; not the fallback), as a forward's products read them or, "
      "backward, a backward's");
}

}  // namespace

void bind_experts(py::module_& m) {
  py::enum_<moe::Activation>(m, "Activation", "the expert FFN's activation")
      .value("swiglu", moe::Activation::swiglu)
      .value("gelu", moe::Activation::gelu)
      .value("clamped_swiglu", moe::Activation::clamped_swiglu);
  bind_packed_class(m);  // first: the kernels' signatures name it
  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
  bind_packing(m);
}

}  // namespace moe_bind
