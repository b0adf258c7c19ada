// Placeholder: the trajectory arena lands in its own issue. Keeps module.cpp's registration hook linkable.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_arena(py::module_& m) { (void)m; }
