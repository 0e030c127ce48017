// Host emulation of the CUDA execution model, for tests only.
//
// CI machines have no GPU. A test translation unit that includes this header before a kernel
// header can compile CUDA-core kernel source with g++ and run it on the CPU under ASan, UBSan or
// TSan, to catch out-of-bounds accesses, races and missing barriers in the kernel code. It is a
// test tool, not a CPU backend: every CUDA thread is a std::thread, so it is slow.
//
// Execution model
//   cuda_emulation::launch(kernel, grid, block, dynamic_shared_bytes, args...) stands for
//   kernel<<<grid, block, dynamic_shared_bytes>>>(args...) followed by a device synchronize.
//   The arguments are converted to the kernel's parameter types once, as on a GPU. Blocks run
//   one after another (blockIdx.x fastest, then y, then z). The threads of a block are real
//   std::threads, one pool of blockDim threads per launch reused for every block, so a missing
//   __syncthreads() is a real race. Between blocks all pool threads meet at a barrier, so no
//   block starts while the previous one still uses shared memory. Lane = linear thread id % 32,
//   with the linear id x + y * blockDim.x + z * blockDim.x * blockDim.y as on hardware. Dynamic
//   shared memory is a heap buffer of exactly the requested size, so ASan sees overruns of it.
//
// Rules and limits for kernel authors
//   1. Every thread of a block reaches a given __syncthreads(), or none does. A whole block may
//      return early; if some threads return while others still call __syncthreads() the
//      emulator aborts with a message (on a GPU that hangs or corrupts silently).
//   2. Warp intrinsics (__syncwarp, __shfl*_sync) take the full mask 0xffffffff only and need all
//      32 lanes of the warp: they abort in the partial last warp of a block whose size is not a
//      multiple of 32, and when some lanes of the warp have returned. Whole warps may return.
//   3. Part of a warp inside __syncthreads() while the rest waits in a warp intrinsic deadlocks;
//      run emulated kernels with a timeout.
//   4. __shared__ is `static`: one block runs at a time, so a function-local static is the
//      block's shared memory. Only trivially constructible types (POD scalars and arrays). They
//      keep their contents from the previous block, so reading them before writing is not
//      caught; dynamic shared memory is refilled with 0xCD bytes before every block, so that is.
//   5. Dynamic shared memory is declared with PCONV_DYNAMIC_SHARED(type, name). This header
//      defines the emulator side; the kernel header defines the nvcc side, under
//      #ifndef PCONV_CUDA_EMULATION, as a macro that expands to
//        extern __shared__ __align__(16) unsigned char pconv_dynamic_shared_[];
//        type* name = reinterpret_cast<type*>(pconv_dynamic_shared_)
//   6. Only the CUDA core language: no __CUDA_ARCH__ (not defined here), no <<<>>>, no device
//      library calls beyond the intrinsics below, no inline PTX, no cooperative groups. Tensor-core
//      instructions (mma.sync, ldmatrix) and cp.async are reached through csrc/cuda/warp_mma.cuh,
//      whose emulator side is warp_mma_emulation.h (included at the end of this header); they
//      follow rule 2 like the shuffles. cp.async copies land at the cp_async_wait that covers
//      them, not before.
//   7. One launch at a time per process (static shared memory is process-wide). Launch limits
//      are checked as on a GPU (1..1024 threads per block, blockDim.z <= 64, gridDim.y and .z
//      <= 65535); the dynamic shared memory size is not limited.
#pragma once

#define PCONV_CUDA_EMULATION 1

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <concepts>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
// __restrict__ is left as it is: g++ understands it.

#define PCONV_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(cuda_emulation::dynamic_shared_memory())

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int size_x = 1, unsigned int size_y = 1, unsigned int size_z = 1)
      : x(size_x), y(size_y), z(size_z) {}
};

using cudaStream_t = struct CUstream_st*;

inline constexpr int warpSize = 32;
inline thread_local uint3 threadIdx{};
inline thread_local uint3 blockIdx{};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {
namespace detail {

// printf-style, without std::string: this header is compiled into every emulated test, and
// string building is slow to compile under the sanitizers.
[[noreturn, gnu::format(printf, 1, 2)]] inline void fail(const char* format, ...) {
  std::fputs("cuda_emulation: ", stderr);
  va_list arguments;
  va_start(arguments, format);
  std::vfprintf(stderr, format, arguments);
  va_end(arguments);
  std::fputs("\n", stderr);
  std::abort();
}

// The threads that wait for each other at a barrier: a whole block for __syncthreads(), or one
// warp for the warp intrinsics. A thread that returns from the kernel leaves the group; a barrier
// phase that only some members reached because the others had left is a kernel bug, reported
// instead of hanging.
class SyncGroup {
 public:
  // Only while no member is running: between blocks.
  void start_block(unsigned int members, const char* description) {
    members_ = members;
    description_ = description;
    barrier_.emplace(members, PhaseCheck{this});
  }
  void sync() {
    arrivals_.fetch_add(1, std::memory_order_relaxed);
    barrier_->arrive_and_wait();
  }
  void leave() { barrier_->arrive_and_drop(); }
  unsigned int members() const { return members_; }

 private:
  struct PhaseCheck {
    SyncGroup* group;
    void operator()() const noexcept { group->check_phase(); }
  };
  void check_phase() noexcept {
    const unsigned int arrived = arrivals_.exchange(0, std::memory_order_relaxed);
    if (arrived != 0 && arrived != members_) {
      fail("only %u of %u %s; the others had returned from the kernel (see the rules in "
           "cuda_emulation.h)", arrived, members_, description_);
    }
  }

  unsigned int members_ = 0;
  const char* description_ = "";
  std::atomic<unsigned int> arrivals_{0};
  std::optional<std::barrier<PhaseCheck>> barrier_;
};

// What one lane can publish to the rest of its warp in one collective step: a shuffled value, or
// a lane's A and B registers of a tensor-core instruction.
struct alignas(16) ExchangeSlot {
  std::byte bytes[32];
};

struct Warp {
  SyncGroup group;
  std::array<ExchangeSlot, warpSize> exchange_slots{};  // one per lane
};

inline constexpr std::align_val_t kDynamicSharedAlignment{16};

struct AlignedDelete {
  void operator()(std::byte* memory) const noexcept {
    ::operator delete(memory, kDynamicSharedAlignment);
  }
};

inline void check_launch_configuration(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    fail("launch: block (%u, %u, %u) is invalid; CUDA allows 1 to 1024 threads per block, "
         "with blockDim.z at most 64", block.x, block.y, block.z);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    fail("launch: grid (%u, %u, %u) is invalid; CUDA needs 1 to 2^31-1 blocks in x and 1 to "
         "65535 in y and z", grid.x, grid.y, grid.z);
  }
}

// The state one launch shares among the threads of its pool.
class Launch {
 public:
  Launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes)
      : grid_(grid),
        block_(block),
        threads_per_block_(block.x * block.y * block.z),
        block_boundary_(threads_per_block_, PrepareBlock{this}),
        warps_((threads_per_block_ + warpSize - 1) / warpSize),
        dynamic_shared_bytes_(dynamic_shared_bytes),
        dynamic_shared_(static_cast<std::byte*>(
            ::operator new(dynamic_shared_bytes, kDynamicSharedAlignment))) {}

  unsigned int threads_per_block() const { return threads_per_block_; }
  void* dynamic_shared_memory() const { return dynamic_shared_.get(); }
  void sync_block() { block_sync_.sync(); }

  // The whole life of pool thread `linear_id`: its thread of every block in turn.
  void run_thread(unsigned int linear_id, const std::function<void()>& kernel_body);

 private:
  struct PrepareBlock {
    Launch* launch;
    void operator()() const noexcept { launch->prepare_block(); }
  };
  // Runs once all threads finished the previous block, before any starts the next.
  void prepare_block() {
    std::memset(dynamic_shared_.get(), 0xCD, dynamic_shared_bytes_);
    block_sync_.start_block(threads_per_block_, "threads of the block reached __syncthreads()");
    constexpr unsigned int lanes_per_warp = warpSize;
    for (unsigned int w = 0; w < warps_.size(); ++w) {
      const unsigned int lanes = std::min(lanes_per_warp, threads_per_block_ - w * lanes_per_warp);
      warps_[w].group.start_block(lanes, "lanes of the warp reached a warp intrinsic");
    }
  }

  const dim3 grid_;
  const dim3 block_;
  const unsigned int threads_per_block_;
  std::barrier<PrepareBlock> block_boundary_;
  SyncGroup block_sync_;
  std::vector<Warp> warps_;
  const std::size_t dynamic_shared_bytes_;
  const std::unique_ptr<std::byte, AlignedDelete> dynamic_shared_;
};

// The cp.async copies of one thread that have not landed yet. The source is read when the copy is
// issued; the destination is written only by the cp.async.wait_group that covers the copy, so a
// kernel that reads its shared-memory tile before waiting sees the old contents (on a GPU it
// would race). Copies still pending when the thread finishes its block are dropped.
class AsyncCopies {
 public:
  static constexpr std::size_t kMaxBytes = 16;

  // `source` null: a zero fill (cp.async with src-size 0).
  void issue(void* destination, const void* source, std::size_t bytes) {
    Copy copy{destination, bytes, {}};
    if (source != nullptr) std::memcpy(copy.data.data(), source, bytes);
    pending_.push_back(copy);
  }
  void commit_group() { group_ends_.push_back(pending_.size()); }
  // cp.async.wait_group: lands every committed group but the `newest_pending` newest ones.
  void wait_group(std::size_t newest_pending) {
    if (group_ends_.size() <= newest_pending) return;
    const std::size_t landed_groups = group_ends_.size() - newest_pending;
    const std::size_t landed = group_ends_[landed_groups - 1];
    for (std::size_t i = 0; i < landed; ++i) {
      std::memcpy(pending_[i].destination, pending_[i].data.data(), pending_[i].bytes);
    }
    pending_.erase(pending_.begin(), pending_.begin() + landed);
    group_ends_.erase(group_ends_.begin(), group_ends_.begin() + landed_groups);
    for (std::size_t& end : group_ends_) end -= landed;
  }
  void drop_all() {
    pending_.clear();
    group_ends_.clear();
  }

 private:
  struct Copy {
    void* destination;
    std::size_t bytes;
    std::array<std::byte, kMaxBytes> data;
  };
  std::vector<Copy> pending_;
  std::vector<std::size_t> group_ends_;  // pending_.size() at each commit, oldest first
};
inline thread_local AsyncCopies this_thread_async_copies;

// Which launch, warp and lane the calling pool thread belongs to; empty outside a kernel.
struct ThreadContext {
  Launch* launch = nullptr;
  Warp* warp = nullptr;
  unsigned int lane = 0;
};
inline thread_local ThreadContext this_thread_context;

inline void Launch::run_thread(unsigned int linear_id, const std::function<void()>& kernel_body) {
  blockDim = block_;
  gridDim = grid_;
  threadIdx = {linear_id % block_.x, linear_id / block_.x % block_.y,
               linear_id / (block_.x * block_.y)};
  this_thread_context = {this, &warps_[linear_id / warpSize], linear_id % warpSize};
  const unsigned long long blocks_per_layer = 1ull * grid_.x * grid_.y;
  const unsigned long long blocks = blocks_per_layer * grid_.z;
  for (unsigned long long b = 0; b < blocks; ++b) {
    block_boundary_.arrive_and_wait();
    blockIdx = {static_cast<unsigned int>(b % grid_.x),
                static_cast<unsigned int>(b / grid_.x % grid_.y),
                static_cast<unsigned int>(b / blocks_per_layer)};
    kernel_body();
    this_thread_async_copies.drop_all();
    this_thread_context.warp->group.leave();
    block_sync_.leave();
  }
}

inline Launch& current_launch(const char* caller) {
  if (this_thread_context.launch == nullptr) {
    fail("%s called outside a kernel run by cuda_emulation::launch", caller);
  }
  return *this_thread_context.launch;
}

inline Warp& warp_for_intrinsic(unsigned int mask, const char* caller) {
  const Launch& launch = current_launch(caller);
  if (mask != 0xffffffffu) fail("%s: only the full mask 0xffffffff is supported", caller);
  Warp& warp = *this_thread_context.warp;
  if (warp.group.members() != warpSize) {
    fail("%s used in a partial warp of %u lanes (block of %u threads); a full-mask warp "
         "intrinsic needs all 32 lanes", caller, warp.group.members(), launch.threads_per_block());
  }
  return warp;
}

// The caller's lane, after checking that a shuffle of segments of `width` lanes may run here.
inline unsigned int shuffle_lane(unsigned int mask, int width, const char* caller) {
  warp_for_intrinsic(mask, caller);
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0) {
    fail("%s: width %d is not a power of two from 1 to 32", caller, width);
  }
  return this_thread_context.lane;
}

// The step every warp-collective instruction is built on: every lane publishes `value`, then
// returns read(published), where published(lane) is the value that lane published. Two warp
// barriers: after all lanes wrote, and after all lanes read, before a next collective overwrites
// the slots. The caller has checked that the warp may run a collective (warp_for_intrinsic).
template <typename T, typename Read>
auto warp_collective(const T& value, Read&& read) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(ExchangeSlot),
                "a lane publishes a trivially copyable value of at most 32 bytes");
  Warp& warp = *this_thread_context.warp;
  std::memcpy(warp.exchange_slots[this_thread_context.lane].bytes, &value, sizeof(T));
  warp.group.sync();
  const auto published = [&warp](unsigned int lane) {
    T lane_value;
    std::memcpy(&lane_value, warp.exchange_slots[lane].bytes, sizeof(T));
    return lane_value;
  };
  auto result = read(published);
  warp.group.sync();
  return result;
}

template <typename T>
T exchange(T value, unsigned int source_lane) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffles take values of at most 8 bytes");
  return warp_collective(value, [source_lane](const auto& published) {
    return published(source_lane);
  });
}

// Runs `kernel_body` in every thread of every block of the grid, and returns when all are done.
inline void run_grid(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
                     const std::function<void()>& kernel_body) {
  check_launch_configuration(grid, block);
  Launch state(grid, block, dynamic_shared_bytes);
  std::vector<std::thread> pool;
  pool.reserve(state.threads_per_block());
  try {
    for (unsigned int id = 0; id < state.threads_per_block(); ++id) {
      pool.emplace_back(&Launch::run_thread, &state, id, std::cref(kernel_body));
    }
  } catch (const std::system_error& error) {
    // The threads already started wait for the missing ones: stop rather than hang.
    fail("launch: could not start a thread: %s", error.what());
  }
  for (std::thread& thread : pool) thread.join();
}

template <typename T>
concept AtomicAddType = std::same_as<T, int> || std::same_as<T, unsigned int> ||
                        std::same_as<T, unsigned long long> || std::same_as<T, float> ||
                        std::same_as<T, double>;

}  // namespace detail

// Memory from PCONV_DYNAMIC_SHARED: dynamic_shared_bytes of the launch, 16-byte aligned.
inline void* dynamic_shared_memory() {
  return detail::current_launch("dynamic_shared_memory()").dynamic_shared_memory();
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared_bytes,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "cuda_emulation::launch: the number of arguments differs from the kernel's");
  // Converted to the parameter types once, as on a GPU; each thread gets its own copy.
  const std::tuple<std::remove_cvref_t<Params>...> parameters(std::forward<Args>(args)...);
  detail::run_grid(grid, block, dynamic_shared_bytes, [&] { std::apply(kernel, parameters); });
}

}  // namespace cuda_emulation

inline void __syncthreads() {
  cuda_emulation::detail::current_launch("__syncthreads()").sync_block();
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  cuda_emulation::detail::warp_for_intrinsic(mask, "__syncwarp()").group.sync();
}

template <typename T>
T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(
      var, (lane & ~(segment - 1)) | (static_cast<unsigned int>(srcLane) & (segment - 1)));
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_up_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(var, lane % segment >= delta ? lane - delta : lane);
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize) {
  const unsigned int lane =
      cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_down_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(var,
                                          delta < segment - lane % segment ? lane + delta : lane);
}

// A source lane past the caller's segment yields the caller's own value; earlier segments are
// readable, as on hardware.
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_xor_sync()");
  const unsigned int segment_last_lane = lane | (static_cast<unsigned int>(width) - 1);
  const unsigned int source = lane ^ static_cast<unsigned int>(laneMask);
  return cuda_emulation::detail::exchange(var, source <= segment_last_lane ? source : lane);
}

template <cuda_emulation::detail::AtomicAddType T>
T atomicAdd(T* address, std::type_identity_t<T> value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}

inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> target(*address);
  int old = target.load();
  while (old < value && !target.compare_exchange_weak(old, value)) {
  }
  return old;
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

#include "warp_mma_emulation.h"
