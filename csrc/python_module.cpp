// Makes the shared library importable as `instseg_ops._C`. Importing it runs
// the static TORCH_LIBRARY registrations; the module itself exports nothing.
// Only the setuptools build compiles this file (the CMake library is loaded
// with torch.ops.load_library instead).
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef instseg_module = {
      PyModuleDef_HEAD_INIT, "_C", "instseg_ops compiled operators", -1, nullptr,
  };
  return PyModule_Create(&instseg_module);
}
