// Python entry point of elastic_cuda._C. Importing the module loads the shared library, whose static
// initialisers register the elastic:: operators with the dispatcher; the module itself holds nothing.
// Only setup.py builds this file (CMake builds a plain C++ library for torch.ops.load_library).
#ifdef ELASTIC_PYTHON_MODULE
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "elastic_cuda operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
