// The `instseg` operator namespace. Each op adds its schemas with
// TORCH_LIBRARY_FRAGMENT in csrc/<op>.cpp.
#include <torch/library.h>

TORCH_LIBRARY(instseg, m) {}
