// Zero-initialised CPU tensors that cost nothing until written.
//
// A large output that a kernel only partly writes (a mask canvas is mostly
// background) would otherwise pay twice: a memset pass over all of it, and a
// page fault per 4 KiB page on first touch of freshly mapped memory. Here large
// tensors come straight from an anonymous mmap: the kernel supplies zero pages
// on demand (reading an untouched page maps the shared zero page), and the
// mapping asks for transparent huge pages, which cuts the faults 512-fold where
// THP is enabled in "madvise" or "always" mode. Small tensors use at::zeros.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

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
    (void)madvise(reinterpret_cast<void*>(aligned), body, MADV_HUGEPAGE);  // a hint; may fail
    auto* mapping = new Mapping{base, len};
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

// A zero-filled CPU tensor of `sizes` and `dtype`, lazily zeroed when large.
inline at::Tensor lazy_zeros(at::IntArrayRef sizes, at::ScalarType dtype) {
#if defined(__linux__)
  constexpr int64_t kMinBytes = int64_t(8) << 20;
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  if (numel * static_cast<int64_t>(c10::elementSize(dtype)) >= kMinBytes) {
    static LazyZeroAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     std::nullopt);
  }
#endif
  return at::zeros(sizes, at::TensorOptions().dtype(dtype));
}

}  // namespace instseg
