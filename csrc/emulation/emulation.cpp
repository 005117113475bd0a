// The `instseg_emu` op namespace: the project's CUDA kernels compiled against
// the CPU emulation (cuda_emulation.h) register their ops here for the CPU
// dispatch key (INSTSEG_CUDA_LIBRARY_IMPL in csrc/cuda/cuda_compat.h). The
// schemas of the kernel ops are copied from `instseg` at load time by
// tests/emu_utils.py; this file adds the emulation's own settings op.
#include <torch/library.h>

#include <string>

#include "../cuda/cuda_compat.h"

namespace {

// schedule: "index", "reverse" or "random" (seeded by `seed`), for the
// threads between synchronisation points and for the blocks; sm_count: what
// multiprocessor_count() reports (1 makes grid-stride loops wrap).
void configure(std::string schedule, int64_t seed, int64_t sm_count) {
  instseg_emu::Config c;
  if (schedule == "index") c.schedule = instseg_emu::Schedule::Index;
  else if (schedule == "reverse") c.schedule = instseg_emu::Schedule::Reverse;
  else if (schedule == "random") c.schedule = instseg_emu::Schedule::Random;
  else TORCH_CHECK(false, "instseg_emu::_configure: unknown schedule '", schedule, "'");
  TORCH_CHECK(sm_count >= 1 && sm_count <= 4096, "instseg_emu::_configure: sm_count ", sm_count);
  c.seed = static_cast<uint64_t>(seed);
  c.sm_count = static_cast<int>(sm_count);
  instseg_emu::config() = c;
}

// "address", "thread" (the OS-thread backend) or "".
std::string sanitizer() {
#if defined(INSTSEG_EMU_ASAN)
  return "address";
#elif defined(INSTSEG_EMU_THREADS)
  return "thread";
#else
  return "";
#endif
}

}  // namespace

TORCH_LIBRARY(instseg_emu, m) {
  m.def("_configure(str schedule, int seed, int sm_count) -> ()", &configure);
  m.def("_sanitizer() -> str", &sanitizer);
}
