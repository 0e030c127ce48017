// partialconv_cuda._C: importing it loads this library, whose static initialisers register the ops
// with the dispatcher (TORCH_LIBRARY / TORCH_LIBRARY_IMPL). Its functions hold the state behind
// partialconv_cuda.backends (the CUDA path choice of path_choice.h).
#include <Python.h>

#include "path_choice.h"

namespace {

PyObject* set_benchmark(PyObject*, PyObject* enabled) {
  const int value = PyObject_IsTrue(enabled);
  if (value < 0) return nullptr;
  partialconv::benchmark_enabled() = value != 0;
  Py_RETURN_NONE;
}

PyObject* benchmark(PyObject*, PyObject*) { return PyBool_FromLong(partialconv::benchmark_enabled() ? 1 : 0); }

PyObject* clear_measured_paths(PyObject*, PyObject*) {
  partialconv::measured_choices().clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_benchmark", set_benchmark, METH_O, "Sets partialconv_cuda.backends.benchmark."},
    {"_benchmark", benchmark, METH_NOARGS, "partialconv_cuda.backends.benchmark."},
    {"_clear_measured_paths", clear_measured_paths, METH_NOARGS, "Forgets the measured CUDA path choices."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
