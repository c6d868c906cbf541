// Whether every value of a buffer is finite: the boundary's NaN/Inf checks, without the
// bool temporary (and second pass) of NumPy's isfinite(x).all().
#pragma once
#include "tensor.h"

namespace moe {

template <typename T>
bool all_finite(const T* p, index_t n);

}  // namespace moe
