// The Python module that carries the native kernels.
//
// The kernels register themselves with the PyTorch dispatcher (TORCH_LIBRARY_IMPL in each
// backend's sources) when this shared library is loaded; the op schemas live in
// llaca_optim/ops/library.py so that the package works, through the reference backend, without it.
// Importing the module is therefore all Python ever does with it: it needs no functions, only an
// init symbol so that `import llaca_optim._C` (installed build) and
// torch.utils.cpp_extension.load (build on first use) can load it. Plain Python C API instead of
// pybind11 keeps this translation unit cheap to compile.
#include <Python.h>

#define LLACA_STRINGIFY_(x) #x
#define LLACA_STRINGIFY(x) LLACA_STRINGIFY_(x)
#define LLACA_CONCAT_(a, b) a##b
#define LLACA_CONCAT(a, b) LLACA_CONCAT_(a, b)

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME must be defined by the build (setup.py and the JIT build both do)"
#endif

static struct PyModuleDef llaca_module = {
    PyModuleDef_HEAD_INIT, LLACA_STRINGIFY(TORCH_EXTENSION_NAME),
    "Native kernels of llaca_optim; they register with the PyTorch dispatcher on import.", -1,
    nullptr};

PyMODINIT_FUNC LLACA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&llaca_module);
}
