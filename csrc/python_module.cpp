// partialconv_cuda._C: an empty Python module. Importing it loads this library, whose static
// initialisers register the ops with the dispatcher (TORCH_LIBRARY / TORCH_LIBRARY_IMPL).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
