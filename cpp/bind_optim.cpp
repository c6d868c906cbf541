// Bindings of cpp/optim.h: the AdamW update and the gradient norm's sum of squares.
#include "bind_common.h"
#include "optim.h"

namespace moe_bind {

namespace {

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("lr"),
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("g"), "sum of g**2 in float64, in a fixed order",
      "sum of g**2 in float64, in a fixed order");
}

}  // namespace

void bind_optim(py::module_& m) {
  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
