// Emulation build only (first on the include path): stands in for torch's
// <c10/cuda/CUDAGuard.h>, which needs the CUDA runtime. What csrc/cuda/*.cu use of
// it comes from csrc/cuda/cuda_compat.h.
#pragma once
#include "../../../cuda_emulation.h"
