// The module moe_py._core: one binder per kernel file (bind_*.cpp). Every binding takes
// keyword arguments; moe_py/_core.pyi types them and moe_py/_kernels.py is the only
// Python module that calls them.
#include "bind_common.h"
#include "blas.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "moe_py C++ kernels (router, losses, dispatch/combine, experts, LM parts)";
  moe::blas_init();
  moe_bind::bind_system(m);
  moe_bind::bind_router(m);
  moe_bind::bind_dispatch(m);
  moe_bind::bind_experts(m);
  moe_bind::bind_nn(m);
  moe_bind::bind_lm_losses(m);
  moe_bind::bind_optim(m);
  moe_bind::bind_bf16(m);
}
