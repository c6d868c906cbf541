// Bindings of cpp/dispatch.h: gather and combine with their backwards (the plan is untyped).
#include "bind_common.h"
#include "dispatch.h"

#include <algorithm>
#include <vector>

namespace moe_bind {

namespace {

template <typename T>
void bind_typed(py::module_& m, const std::string& sfx) {
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("row_token"),
      "xs[r] = x[row_token[r]]: the tokens' rows grouped by expert");

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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("dxs"), py::arg("slot_row"),
      "dx[t] = sum over t's kept slots of dxs[slot_row[t, j]] (fixed slot order)");

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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("ye"), py::arg("slot_row"), py::arg("topk_weights"),
      "y[t] = sum_j topk_weights[t, j] * ye[slot_row[t, j]]");

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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("dy"), py::arg("ye"), py::arg("slot_row"), py::arg("topk_weights"),
      "(dye, d_topk_weights) of combine_forward");

  m.def(
      ("dispatch_weighted" + sfx).c_str(),
      [](In<T> x, Idx slot_row, In<T> weights, index_t rows) {
        const index_t n = slot_row.shape(0), k = slot_row.shape(1), d = x.shape(1);
        expect_shape(x, "x", {n, d});
        expect_shape(weights, "topk_weights", {n, k});
        const index_t* sr = slot_row.data();
        // every row is some slot's (the plan's rows are exactly the kept slots)
        std::vector<char> seen(rows, 0);
        for (index_t i = 0; i < n * k; ++i) {
          if (sr[i] >= rows) throw std::invalid_argument("slot_row: out of range");
          if (sr[i] >= 0) seen[sr[i]] = 1;
        }
        if (std::find(seen.begin(), seen.end(), 0) != seen.end())
          throw std::invalid_argument("rows: a row no slot fills");
        auto xs = empty<T>({rows, d});
        T* out = xs.mutable_data();
        py::gil_scoped_release release;
        moe::dispatch_weighted<T>(x.data(), sr, weights.data(), n, k, d, out);
        return xs;
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("x"), py::arg("slot_row"),
      py::arg("topk_weights"), py::arg("rows"),
      "xs[slot_row[t, j]] = topk_weights[t, j] * x[t]: the rows of the input-scaled combine");

  m.def(
      ("dispatch_weighted_backward" + sfx).c_str(),
      [](In<T> dxs, In<T> x, Idx slot_row, In<T> weights) {
        const index_t rows = dxs.shape(0), d = dxs.shape(1);
        const index_t n = slot_row.shape(0), k = slot_row.shape(1);
        expect_shape(x, "x", {n, d});
        expect_shape(weights, "topk_weights", {n, k});
        const index_t* sr = slot_row.data();
        for (index_t i = 0; i < n * k; ++i)
          if (sr[i] >= rows) throw std::invalid_argument("slot_row: out of range");
        auto dx = empty<T>({n, d});
        auto dw = empty<T>({n, k});
        T *dxp = dx.mutable_data(), *dwp = dw.mutable_data();
        {
          py::gil_scoped_release release;
          moe::dispatch_weighted_backward<T>(dxs.data(), x.data(), sr, weights.data(), n, k, d,
                                             dxp, dwp);
        }
        return py::make_tuple(dx, dw);
      },
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("dxs"), py::arg("x"),
      py::arg("slot_row"), py::arg("topk_weights"),
      "(dx, d_topk_weights) of dispatch_weighted");
}

}  // namespace

void bind_dispatch(py::module_& m) {
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
      py::call_guard<UseRequestedThreads>(), py::kw_only(), py::arg("topk_indices"), py::arg("dropped"), py::arg("num_experts"),
      "(offsets [E+1], row_token [N], slot_row [T, k]): kept slots sorted by expert, then token");

  bind_typed<float>(m, "_f32");
  bind_typed<double>(m, "_f64");
}

}  // namespace moe_bind
