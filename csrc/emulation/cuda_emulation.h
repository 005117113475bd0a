// CUDA emulation: compiles the project's .cu files (kernels and host launch
// code) as C++ and runs their kernels on the CPU, for tests on machines
// without a GPU. Included through csrc/cuda/cuda_compat.h when
// INSTSEG_CUDA_EMULATION is defined; never part of the real builds (setup.py
// and CMakeLists.txt do not glob csrc/emulation/).
//
// Model:
// - A launch runs the whole grid before returning, one block at a time; the
//   block's threads are fibers (one stack each, switched with _setjmp/_longjmp,
//   started with makecontext), run by a scheduler in index, reverse or seeded
//   random order between synchronisation points (blocks in the same order).
// - `__shared__` is a function-local static: exactly one block's shared memory,
//   with AddressSanitizer redzones when the kernel has internal linkage.
//   Dynamic shared memory is a heap block of exactly the launch's size,
//   refilled with 0xff bytes for every block.
// - __syncthreads and the *_sync warp collectives are rendezvous checked by the
//   scheduler: every live thread of the block (every lane of the mask) must wait
//   at the same call site (with the same mask); otherwise, or when a lane named
//   in a mask has exited, or nothing can progress, the launch raises an error
//   naming the threads and call sites.
// - Atomics are relaxed compare-and-swap loops; launch limits are checked.
// Configuration (schedule, seed, SM count) through instseg_emu::config().
#pragma once

#include <c10/util/Exception.h>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <math.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// Under ThreadSanitizer (-fsanitize=thread) the threads of a block are OS
// threads instead of fibers, synchronised through a mutex, so that TSan sees
// every access between two barriers as concurrent and names racing lines.
#if defined(__SANITIZE_THREAD__)
#define INSTSEG_EMU_THREADS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define INSTSEG_EMU_THREADS 1
#endif
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define INSTSEG_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define INSTSEG_EMU_ASAN 1
#endif
#endif

// ---------------------------------------------------------------------------
// Vocabulary.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define __constant__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

using cudaStream_t = struct instseg_emu_stream*;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// In the real build these come from c10/cuda/CUDAException.h: an emulated
// launch has finished (or raised) by the time the macro runs.
#ifndef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                  \
  } while (0)
#endif

namespace instseg_emu {

enum class Schedule { Index, Reverse, Random };

struct Config {
  Schedule schedule = Schedule::Index;
  uint64_t seed = 0;
  int sm_count = 132;  // an H100 SXM / H200
};

inline Config& config() {
  static Config c;
  return c;
}

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
};

inline std::string str(const Site& s) {
  const char* f = std::strrchr(s.file, '/');
  return std::string(f ? f + 1 : s.file) + ":" + std::to_string(s.line);
}

enum class Wait { Runnable, Barrier, Warp, Done };
enum class Coll { Ballot, Any, All, Shfl, ShflUp, ShflDown, ShflXor, SyncWarp };

inline const char* coll_name(Coll c) {
  switch (c) {
    case Coll::Ballot: return "__ballot_sync";
    case Coll::Any: return "__any_sync";
    case Coll::All: return "__all_sync";
    case Coll::Shfl: return "__shfl_sync";
    case Coll::ShflUp: return "__shfl_up_sync";
    case Coll::ShflDown: return "__shfl_down_sync";
    case Coll::ShflXor: return "__shfl_xor_sync";
    case Coll::SyncWarp: return "__syncwarp";
  }
  return "?";
}

constexpr size_t kStackSize = size_t(512) << 10;  // per CUDA thread (ASan frames are large)
constexpr int kMaxThreads = 1024;

struct Fiber {
  // Switching state.
  ucontext_t uc;
  jmp_buf buf;
  char* stack = nullptr;  // usable part, above the guard page
  bool started = false;
  void* fake_stack = nullptr;
  // CUDA thread state.
  uint3 tid{0, 0, 0};
  int linear = 0;
  Wait wait = Wait::Done;
  Site site;
  // Warp collective: kind, mask, operand (up to 16 bytes), lane argument, width, result.
  Coll coll = Coll::Ballot;
  unsigned mask = 0;
  unsigned char value[16];
  size_t value_size = 0;
  int arg = 0;
  int width = 32;
  unsigned char result[16];
};

struct Runtime {
  std::vector<std::unique_ptr<Fiber>> fibers;
  jmp_buf sched_buf;
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  Fiber* starting = nullptr;
  std::function<void()>* body = nullptr;  // runs one CUDA thread of the current launch
  std::exception_ptr error;
  // Dynamic shared memory of the current launch.
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_size = 0;
  bool in_launch = false;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

// The CUDA thread running on this OS thread.
inline thread_local Fiber* current = nullptr;

// Thread backend: the block's shared state.
struct ThreadBlock {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<Fiber*> th;
  int running = 0;
  bool abort = false;
  std::exception_ptr error;
};
inline ThreadBlock* thread_block = nullptr;
struct Aborted {};

[[noreturn]] inline void fail(const std::string& msg) { TORCH_CHECK(false, "CUDA emulation: ", msg); }

// Fiber switches, annotated for AddressSanitizer.
inline void switch_to_scheduler(Fiber* f) {
  Runtime& r = rt();
#ifdef INSTSEG_EMU_ASAN
  __sanitizer_start_switch_fiber(&f->fake_stack, r.sched_stack_bottom, r.sched_stack_size);
#endif
  if (_setjmp(f->buf) == 0) _longjmp(r.sched_buf, 1);
#ifdef INSTSEG_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
}

inline void fiber_entry() {
  Runtime& r = rt();
  Fiber* f = r.starting;
#ifdef INSTSEG_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack_bottom, &r.sched_stack_size);
#endif
  for (;;) {
    try {
      (*r.body)();
    } catch (...) {
      if (!r.error) r.error = std::current_exception();
    }
    f->wait = Wait::Done;
    switch_to_scheduler(f);  // resumed for the next block's thread
  }
}

inline Fiber* fiber(int i) {
  Runtime& r = rt();
  while (static_cast<int>(r.fibers.size()) <= i) {
    auto f = std::make_unique<Fiber>();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackSize + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "CUDA emulation: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults
    f->stack = static_cast<char*>(mem) + page;
    r.fibers.push_back(std::move(f));
  }
  return r.fibers[i].get();
}

// Runs fiber f until it blocks or finishes its CUDA thread.
inline void resume(Fiber* f) {
  Runtime& r = rt();
  current = f;
  threadIdx = f->tid;
#ifdef INSTSEG_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.sched_fake_stack, f->stack, kStackSize);
#endif
  if (_setjmp(r.sched_buf) == 0) {
    if (!f->started) {
#ifdef INSTSEG_EMU_ASAN
      ASAN_UNPOISON_MEMORY_REGION(f->stack, kStackSize);
#endif
      getcontext(&f->uc);
      f->uc.uc_stack.ss_sp = f->stack;
      f->uc.uc_stack.ss_size = kStackSize;
      f->uc.uc_link = nullptr;
      makecontext(&f->uc, fiber_entry, 0);
      f->started = true;
      r.starting = f;
      setcontext(&f->uc);
    } else {
      _longjmp(f->buf, 1);
    }
  }
#ifdef INSTSEG_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.sched_fake_stack, nullptr, nullptr);
#endif
  current = nullptr;
}

inline Fiber& self() {
  Fiber* f = current;
  TORCH_CHECK(f != nullptr, "CUDA emulation: a device function was called outside a kernel");
  return *f;
}

inline std::string who(const Fiber& f) {
  std::ostringstream o;
  o << "thread (" << f.tid.x << "," << f.tid.y << "," << f.tid.z << ") of block (" << blockIdx.x
    << "," << blockIdx.y << "," << blockIdx.z << ")";
  return o.str();
}

inline std::string where(const Fiber& f) {
  switch (f.wait) {
    case Wait::Barrier: return "__syncthreads at " + str(f.site);
    case Wait::Warp: {
      std::ostringstream o;
      o << coll_name(f.coll) << "(mask 0x" << std::hex << f.mask << ") at " << str(f.site);
      return o.str();
    }
    case Wait::Done: return "exited";
    default: return "running";
  }
}

// Settles the warp collectives whose lanes have all arrived; raises for
// mismatched ones. Returns whether any was released.
inline bool settle_warps(std::vector<Fiber*>& th) {
  bool released = false;
  const int n = static_cast<int>(th.size());
  for (int w0 = 0; w0 < n; w0 += 32) {
    const int lanes = std::min(32, n - w0);
    for (int l = 0; l < lanes; ++l) {
      Fiber& a = *th[w0 + l];
      if (a.wait != Wait::Warp) continue;
      if (!((a.mask >> l) & 1u))
        fail(who(a) + " calls " + where(a) + " with a mask that excludes its own lane " + std::to_string(l));
      bool complete = true;
      for (int m = 0; m < 32; ++m) {
        if (!((a.mask >> m) & 1u)) continue;
        if (m >= lanes) fail(who(a) + ": " + where(a) + " names lane " + std::to_string(m) +
                             ", which does not exist in this block");
        Fiber& b = *th[w0 + m];
        if (b.wait == Wait::Done)
          fail(who(a) + " waits at " + where(a) + " for lane " + std::to_string(m) + " (" + who(b) +
               "), which has exited");
        if (b.wait == Wait::Warp) {
          if (b.site != a.site || b.coll != a.coll || b.mask != a.mask || b.width != a.width)
            fail("divergent warp collectives: " + who(a) + " at " + where(a) + ", " + who(b) + " at " +
                 where(b));
        } else {
          complete = false;  // at a barrier: resolved (as an error) below if nothing moves
        }
      }
      if (!complete) continue;
      // Everyone is here: compute the results.
      unsigned vote = 0;
      for (int m = 0; m < lanes; ++m) {
        if (!((a.mask >> m) & 1u)) continue;
        Fiber& b = *th[w0 + m];
        uint32_t pred = 0;
        std::memcpy(&pred, b.value, std::min<size_t>(sizeof(pred), b.value_size));
        if (pred) vote |= 1u << m;
      }
      for (int m = 0; m < lanes; ++m) {
        if (!((a.mask >> m) & 1u)) continue;
        Fiber& b = *th[w0 + m];
        std::memset(b.result, 0, sizeof(b.result));
        const int width = b.width, base = m & ~(width - 1), in = m - base;
        int src = m;
        switch (b.coll) {
          case Coll::Ballot: std::memcpy(b.result, &vote, sizeof(vote)); break;
          case Coll::Any: { const int v = vote != 0; std::memcpy(b.result, &v, sizeof(v)); break; }
          case Coll::All: { const int v = vote == a.mask; std::memcpy(b.result, &v, sizeof(v)); break; }
          case Coll::SyncWarp: break;
          case Coll::Shfl: src = base + (b.arg % width + width) % width; break;
          case Coll::ShflUp: src = in - b.arg >= 0 ? m - b.arg : m; break;
          case Coll::ShflDown: src = in + b.arg < width ? m + b.arg : m; break;
          case Coll::ShflXor: src = (in ^ b.arg) < width ? base + (in ^ b.arg) : m; break;
        }
        if (b.coll == Coll::Shfl || b.coll == Coll::ShflUp || b.coll == Coll::ShflDown ||
            b.coll == Coll::ShflXor) {
          if (src >= lanes || !((a.mask >> src) & 1u))
            fail(who(b) + " at " + where(b) + " reads lane " + std::to_string(src) +
                 ", which is not in the mask (undefined result)");
          std::memcpy(b.result, th[w0 + src]->value, b.value_size);
        }
      }
      for (int m = 0; m < lanes; ++m)
        if ((a.mask >> m) & 1u) th[w0 + m]->wait = Wait::Runnable;
      released = true;
    }
  }
  return released;
}

inline std::vector<int> order(int n, Schedule s, std::mt19937_64& rng) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = s == Schedule::Reverse ? n - 1 - i : i;
  if (s == Schedule::Random) std::shuffle(o.begin(), o.end(), rng);
  return o;
}

inline bool settle(std::vector<Fiber*>& th);

// Runs one block to completion.
inline void run_block(int nthreads, const dim3& block, std::mt19937_64& rng) {
  Runtime& r = rt();
  std::vector<Fiber*> th(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber* f = fiber(i);
    f->linear = i;
    f->tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f->wait = Wait::Runnable;
    th[i] = f;
  }
  const Schedule s = config().schedule;
  for (;;) {
    for (int i : order(nthreads, s, rng)) {
      if (th[i]->wait != Wait::Runnable) continue;
      resume(th[i]);
      if (r.error) return;
    }
    if (!settle(th)) return;
  }
}

// Called when no thread of the block runs: releases the next rendezvous
// (returns true), or returns false when every thread has exited; raises for
// divergence and deadlock.
inline bool settle(std::vector<Fiber*>& th) {
  {
    bool any_live = false;
    for (Fiber* f : th) any_live |= f->wait != Wait::Done;
    if (!any_live) return false;
    if (settle_warps(th)) return true;
    // Block barrier: every live thread at the same __syncthreads.
    const Fiber* first = nullptr;
    bool all_at_barrier = true;
    for (Fiber* f : th) {
      if (f->wait == Wait::Done) continue;
      if (f->wait != Wait::Barrier) { all_at_barrier = false; continue; }
      if (!first) first = f;
      else if (f->site != first->site)
        fail("divergent __syncthreads: " + who(*first) + " waits at " + str(first->site) + ", " + who(*f) +
             " at " + str(f->site));
    }
    if (all_at_barrier) {
      for (Fiber* f : th)
        if (f->wait == Wait::Barrier) f->wait = Wait::Runnable;
      return true;
    }
    std::string msg = "deadlock: no thread can progress:";
    int shown = 0;
    for (Fiber* f : th) {
      if (f->wait == Wait::Done) continue;
      if (shown++ < 8) msg += "\n  " + who(*f) + ": " + where(*f);
    }
    fail(msg);
  }
}

// Thread backend (ThreadSanitizer builds): the block's threads are OS threads;
// the last one to block or exit settles the rendezvous under the mutex.
inline void settle_threads_locked(ThreadBlock& b) {
  if (b.running > 0 || b.abort) return;
  try {
    if (settle(b.th))
      for (Fiber* f : b.th) b.running += f->wait == Wait::Runnable;
  } catch (...) {
    b.error = std::current_exception();
    b.abort = true;
  }
  b.cv.notify_all();
}

inline void run_block_threads(int nthreads, const dim3& block) {
  ThreadBlock b;
  std::vector<std::unique_ptr<Fiber>> recs;
  for (int i = 0; i < nthreads; ++i) {
    recs.push_back(std::make_unique<Fiber>());
    Fiber* f = recs.back().get();
    f->linear = i;
    f->tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    f->wait = Wait::Runnable;
    b.th.push_back(f);
  }
  b.running = nthreads;
  thread_block = &b;
  const uint3 bi = blockIdx;
  const dim3 bd = blockDim, gd = gridDim;
  std::function<void()>* body = rt().body;
  std::vector<std::thread> ts;
  for (int i = 0; i < nthreads; ++i) {
    ts.emplace_back([&b, bi, bd, gd, body, i] {
      Fiber* f = b.th[i];
      current = f;
      threadIdx = f->tid;
      blockIdx = bi;
      blockDim = bd;
      gridDim = gd;
      bool was_running = true;
      try {
        (*body)();
      } catch (Aborted&) {
        was_running = false;  // stopped while waiting: not counted as running
      } catch (...) {
        std::lock_guard<std::mutex> lk(b.mu);
        if (!b.error) b.error = std::current_exception();
        b.abort = true;
        b.cv.notify_all();
      }
      std::lock_guard<std::mutex> lk(b.mu);
      f->wait = Wait::Done;
      if (was_running) --b.running;
      settle_threads_locked(b);
      current = nullptr;
    });
  }
  for (std::thread& t : ts) t.join();
  thread_block = nullptr;
  if (b.error) std::rethrow_exception(b.error);
}

inline int threads_of(const dim3& b) { return static_cast<int>(b.x * b.y * b.z); }

inline void check_launch(const dim3& grid, const dim3& block, size_t smem) {
  TORCH_CHECK(grid.x > 0 && grid.y > 0 && grid.z > 0, "CUDA emulation: invalid launch: empty grid (",
              grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(block.x > 0 && block.y > 0 && block.z > 0, "CUDA emulation: invalid launch: empty block (",
              block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535u && grid.z <= 65535u,
              "CUDA emulation: invalid launch: grid (", grid.x, ", ", grid.y, ", ", grid.z,
              ") beyond (2^31 - 1, 65535, 65535)");
  TORCH_CHECK(block.x <= 1024u && block.y <= 1024u && block.z <= 64u &&
                  uint64_t(block.x) * block.y * block.z <= 1024u,
              "CUDA emulation: invalid launch: block (", block.x, ", ", block.y, ", ", block.z,
              ") has more than 1024 threads or exceeds (1024, 1024, 64)");
  TORCH_CHECK(smem <= 48 * 1024, "CUDA emulation: invalid launch: ", smem,
              " bytes of dynamic shared memory, more than the 48 KiB default limit");
}

// Runs a kernel over the whole grid. `thread` runs one CUDA thread (with the
// current threadIdx/blockIdx).
inline void run_grid(const dim3& grid, const dim3& block, size_t smem, std::function<void()>& thread) {
  Runtime& r = rt();
  TORCH_CHECK(!r.in_launch, "CUDA emulation: a kernel launch from device code (dynamic parallelism) is not emulated");
  check_launch(grid, block, smem);
  const int nthreads = threads_of(block);
  std::unique_ptr<unsigned char[]> dyn(new unsigned char[smem > 0 ? smem : 1]);
  r.in_launch = true;
  r.body = &thread;
  r.error = nullptr;
  r.dyn_smem = smem > 0 ? dyn.get() : nullptr;
  r.dyn_smem_size = smem;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(config().seed);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  const Schedule s = config().schedule;
  // Random block order: a bijection of [0, nblocks), an affine map with an odd
  // multiplier modulo the next power of two, skipping values past the end.
  uint64_t p2 = 1;
  while (p2 < nblocks) p2 <<= 1;
  const uint64_t mul = rng() | 1, add = rng();
  std::exception_ptr err;
  try {
    for (uint64_t b = 0; b < nblocks; ++b) {
      uint64_t id = b;
      if (s == Schedule::Reverse) id = nblocks - 1 - b;
      if (s == Schedule::Random) {
        uint64_t v = b;
        do { v = (v * mul + add) & (p2 - 1); } while (v >= nblocks);
        id = v;
      }
      blockIdx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                       static_cast<unsigned>(id / (uint64_t(grid.x) * grid.y))};
      if (smem > 0) std::memset(dyn.get(), 0xff, smem);
#ifdef INSTSEG_EMU_THREADS
      run_block_threads(nthreads, block);
#else
      run_block(nthreads, block, rng);
#endif
      if (r.error) std::rethrow_exception(r.error);
    }
  } catch (...) {
    err = std::current_exception();
    // Fibers stopped mid-kernel restart from scratch next time.
    for (int i = 0; i < nthreads && i < static_cast<int>(r.fibers.size()); ++i) {
      if (r.fibers[i]->wait != Wait::Done) r.fibers[i]->started = false;
      r.fibers[i]->wait = Wait::Done;
    }
  }
  r.in_launch = false;
  r.body = nullptr;
  r.dyn_smem = nullptr;
  r.error = nullptr;
  if (err) std::rethrow_exception(err);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "CUDA emulation: wrong number of kernel arguments");
  // Converted to the parameter types once, as a launch does; each thread gets a copy.
  const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  std::function<void()> thread = [&]() {
    std::tuple<std::decay_t<P>...> mine = params;
    std::apply(kernel, mine);
  };
  run_grid(grid, block, smem, thread);
}

// Dynamic shared memory of the running launch (an exact-size heap block).
template <typename T>
T* dynamic_shared(size_t align) {
  Runtime& r = rt();
  TORCH_CHECK(r.in_launch, "CUDA emulation: dynamic shared memory outside a kernel");
  if (r.dyn_smem == nullptr) return nullptr;
  TORCH_CHECK(reinterpret_cast<uintptr_t>(r.dyn_smem) % align == 0,
              "CUDA emulation: dynamic shared memory not aligned to ", align);
  return reinterpret_cast<T*>(r.dyn_smem);
}

// A thread blocks at a rendezvous; the scheduler resumes it when released.
inline void block_at(Wait w, const char* file, int line) {
  Fiber& f = self();
  if (thread_block != nullptr) {
    ThreadBlock& b = *thread_block;
    std::unique_lock<std::mutex> lk(b.mu);
    f.wait = w;
    f.site = Site{file, line};
    --b.running;
    settle_threads_locked(b);
    b.cv.wait(lk, [&] { return f.wait == Wait::Runnable || b.abort; });
    if (b.abort) throw Aborted{};
    return;
  }
  f.wait = w;
  f.site = Site{file, line};
  switch_to_scheduler(&f);
  threadIdx = f.tid;
}

template <typename T>
T warp_op(Coll c, unsigned mask, const T& v, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                "CUDA emulation: warp collectives on trivially copyable values up to 16 bytes");
  Fiber& f = self();
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(who(f) + ": " + coll_name(c) + " at " + str(Site{file, line}) + " with width " + std::to_string(width) +
         ", not a power of two in [1, 32]");
  f.coll = c;
  f.mask = mask;
  std::memset(f.value, 0, sizeof(f.value));
  std::memcpy(f.value, &v, sizeof(T));
  f.value_size = sizeof(T);
  f.arg = arg;
  f.width = width;
  block_at(Wait::Warp, file, line);
  T out;
  std::memcpy(&out, f.result, sizeof(T));
  return out;
}

template <typename T>
using atomic_value_t = std::enable_if_t<std::is_trivially_copyable<T>::value, T>;

// old = *p; *p = f(old); return old (relaxed, as CUDA's atomics).
template <typename T, typename F>
T atomic_update(T* p, F&& f) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {
  }
  return old;
}

template <typename T>
T fmin_cuda(T a, T b) { return std::fmin(a, b); }
template <typename T>
T fmax_cuda(T a, T b) { return std::fmax(a, b); }

}  // namespace instseg_emu

// ---------------------------------------------------------------------------
// Device functions.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  instseg_emu::block_at(instseg_emu::Wait::Barrier, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  instseg_emu::warp_op(instseg_emu::Coll::SyncWarp, mask, 0, 0, 32, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<unsigned>(instseg_emu::Coll::Ballot, mask, pred != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<int>(instseg_emu::Coll::Any, mask, pred != 0, 0, 32, file, line);
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<int>(instseg_emu::Coll::All, mask, pred != 0, 0, 32, file, line);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<T>(instseg_emu::Coll::Shfl, mask, v, src, width, file, line);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<T>(instseg_emu::Coll::ShflUp, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<T>(instseg_emu::Coll::ShflDown, mask, v, static_cast<int>(delta), width, file, line);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return instseg_emu::warp_op<T>(instseg_emu::Coll::ShflXor, mask, v, lane_mask, width, file, line);
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

// Correctly rounded arithmetic: what host IEEE arithmetic without contraction gives.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// min/max as CUDA's overloads: mixed argument types meet in their common type;
// the floating-point versions ignore a NaN operand (fminf/fmaxf).
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a_, B b_) {
  using T = std::common_type_t<A, B>;
  const T a = static_cast<T>(a_), b = static_cast<T>(b_);
  if constexpr (std::is_floating_point<T>::value) return std::fmin(a, b);
  else return b < a ? b : a;
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a_, B b_) {
  using T = std::common_type_t<A, B>;
  const T a = static_cast<T>(a_), b = static_cast<T>(b_);
  if constexpr (std::is_floating_point<T>::value) return std::fmax(a, b);
  else return a < b ? b : a;
}

// Atomics (relaxed compare-and-swap loops).
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicAdd(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return static_cast<T>(o + v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicSub(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return static_cast<T>(o - v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicExch(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T) { return v; });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicMin(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return min(o, v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicMax(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return max(o, v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicOr(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return static_cast<T>(o | v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicAnd(T* p, T v) {
  return instseg_emu::atomic_update(p, [&](T o) { return static_cast<T>(o & v); });
}
template <typename T>
inline instseg_emu::atomic_value_t<T> atomicCAS(T* p, T cmp, T v) {
  std::atomic_ref<T> a(*p);
  a.compare_exchange_strong(cmp, v, std::memory_order_relaxed);
  return cmp;
}
