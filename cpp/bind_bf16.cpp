// Bindings of cpp/bf16.h: bfloat16 rounding and the weights' fingerprint.
#include "bf16.h"
#include "bind_common.h"

#include <vector>

namespace moe_bind {

void bind_bf16(py::module_& m) {
  m.def(
      "round_to_bf16",
      [](In<float> x) {
        py::array_t<float> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        const float* in = x.data();
        float* o = out.mutable_data();
        const index_t n = index_t(x.size());
        {
          py::gil_scoped_release release;
          moe::round_to_bf16(in, o, n);
        }
        return out;
      },
      py::kw_only(), py::arg("x"),
      "x rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as float32 values");
  m.def(
      "fingerprint",
      [](In<float> x) {
        const float* p = x.data();
        const index_t n = index_t(x.size());
        moe::Fingerprint f;
        {
          py::gil_scoped_release release;
          f = moe::fingerprint(p, n);
        }
        return py::bytes(reinterpret_cast<const char*>(f.lanes), sizeof f.lanes);
      },
      py::kw_only(), py::arg("x"),
      "64 bytes that change whenever any one value of x changes (bf16.h)");
}

}  // namespace moe_bind
