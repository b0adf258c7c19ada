// b2kernels._C: private, torch-free pybind11 module. The Python layer (b2kernels.buffer) owns the public API.
#include <pybind11/pybind11.h>

namespace py = pybind11;

#ifndef B2K_VERSION
#define B2K_VERSION "0.1.0"
#endif

// Each component registers itself from its own translation unit.
void register_arena(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "b2kernels private C++ extension (trajectory arena)";
  m.def("version", []() { return std::string(B2K_VERSION); }, "Version string of the compiled extension.");
  register_arena(m);
}
