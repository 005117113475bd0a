// Zero-initialised CPU tensors that cost nothing until written.
//
// A large output that a kernel only partly writes (a mask canvas is mostly
// background) would otherwise pay twice: a memset pass over all of it, and a
// page fault on first touch of every page of freshly mapped memory. Here large
// tensors come straight from an anonymous mmap: the kernel supplies zero pages
// on demand (reading an untouched page maps the shared zero page), so only the
// pages a kernel writes are ever faulted in or resident. Small tensors use
// at::zeros.
//
// Environment switches (read once):
//   INSTSEG_LAZY_ZEROS=0  use at::zeros for every size.
//   INSTSEG_POPULATE=0    no MADV_POPULATE_WRITE (populate_for_write below):
//                         pages are faulted in one by one as they are written.
//   INSTSEG_HUGEPAGES=1   also ask for transparent huge pages (MADV_HUGEPAGE):
//                         ~2x faster in a tight loop of pastes, but each touched
//                         2 MiB page becomes resident (4-5x the memory for mask
//                         canvases) and, measured on our 2-core VM, a paste right
//                         after other large allocations was slower (the kernel has
//                         to assemble huge pages). Off by default.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <c10/util/safe_numerics.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace instseg {

#if defined(__linux__)
class LazyZeroAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes == 0) return {nullptr, nullptr, &noop, c10::Device(c10::kCPU)};
    const size_t body = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    const size_t len = body + kHugePage;  // room to align the start to a huge page
    void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "instseg: could not map ", nbytes, " bytes for an output tensor");
    const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) / kHugePage * kHugePage;
    static const bool huge = [] {
      const char* v = std::getenv("INSTSEG_HUGEPAGES");
      return v != nullptr && std::string(v) == "1";
    }();
    if (huge) (void)madvise(reinterpret_cast<void*>(aligned), body, MADV_HUGEPAGE);  // a hint; may fail
    Mapping* mapping = nullptr;
    try {
      mapping = new Mapping{base, len};
    } catch (...) {
      munmap(base, len);
      throw;
    }
    return {reinterpret_cast<void*>(aligned), mapping, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Mapping {
    void* base;
    size_t len;
  };
  static void release(void* ctx) {
    auto* m = static_cast<Mapping*>(ctx);
    munmap(m->base, m->len);
    delete m;
  }
  static void noop(void*) {}
};
#endif

// A zero-filled CPU tensor of `sizes` and `dtype`, lazily zeroed when large;
// `*is_lazy` (when given) tells whether it came from the lazy allocator.
inline at::Tensor lazy_zeros(at::IntArrayRef sizes, at::ScalarType dtype, bool* is_lazy = nullptr) {
  if (is_lazy != nullptr) *is_lazy = false;
#if defined(__linux__)
  constexpr int64_t kMinBytes = int64_t(8) << 20;
  static const bool enabled = [] {
    const char* v = std::getenv("INSTSEG_LAZY_ZEROS");
    return v == nullptr || std::string(v) != "0";
  }();
  int64_t nbytes = static_cast<int64_t>(c10::elementSize(dtype));
  bool overflow = false;
  for (int64_t s : sizes) overflow |= c10::mul_overflows(nbytes, s, &nbytes);
  TORCH_CHECK(!overflow, "instseg: output of size ", sizes, " is too large");
  if (enabled && nbytes >= kMinBytes) {
    // Never destroyed: tensors that outlive static destruction still point at it.
    static LazyZeroAllocator* allocator = new LazyZeroAllocator();
    if (is_lazy != nullptr) *is_lazy = true;
    return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     std::nullopt);
  }
#endif
  return at::zeros(sizes, at::TensorOptions().dtype(dtype));
}

// Faults in, for writing, the pages of [begin, begin + nbytes) of a lazily
// zeroed tensor in one system call (MADV_POPULATE_WRITE, Linux >= 5.14)
// instead of one page fault per page as a kernel first writes each of them.
// The pages are the ones the caller is about to write anyway, so residency is
// unchanged. A hint: on older kernels (EINVAL) or spans under a few pages it
// does nothing and the writes fault the pages in as before.
inline void populate_for_write(void* begin, size_t nbytes) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  constexpr uintptr_t kPage = 4096;
  constexpr size_t kMinBytes = 4 * kPage;
  if (nbytes < kMinBytes) return;
  static std::atomic<bool> supported{[] {
    const char* v = std::getenv("INSTSEG_POPULATE");
    return v == nullptr || std::string(v) != "0";
  }()};
  if (!supported.load(std::memory_order_relaxed)) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(begin) & ~(kPage - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(begin) + nbytes;
  if (madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_WRITE) != 0 && errno == EINVAL) {
    supported.store(false, std::memory_order_relaxed);
  }
#else
  (void)begin;
  (void)nbytes;
#endif
}

}  // namespace instseg
