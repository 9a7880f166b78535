// The module gloro_fast._C: importing it runs the static registrations of csrc/cpu/*.cpp and
// csrc/cuda/*.cpp, which add the C++ kernels of every op to torch's dispatcher under the
// namespace _gloro_fast_cpp (one kernel per dispatch key, CPU and CUDA). The schemas are not
// here: each op's single schema is defined in Python (gloro_fast/ops/<op>.py), which also
// gives these kernel entries that same schema, so the dispatcher checks every C++ signature
// against it. Backend selection and autograd belong to the op, not to the kernels.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
