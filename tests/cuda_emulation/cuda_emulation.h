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
//      emulator aborts with a message (on a GPU that hangs or corrupts silently). "A given"
//      means the same call site: __syncthreads() takes a defaulted std::source_location, and if
//      the threads of one barrier phase called it from different source lines or columns (say
//      each branch of an if has its own) the emulator aborts with "__syncthreads() at different
//      call sites", naming both. A helper function that calls __syncthreads() is one call site
//      for all its callers, so divergence above it is not seen.
//   2. Warp collectives - __syncwarp, __shfl*_sync, and ldmatrix and mma from
//      csrc/cuda/warp_mma.cuh - take the full mask 0xffffffff only and need all 32 lanes of the
//      warp, at the same call site: they abort in the partial last warp of a block whose size is
//      not a multiple of 32, when some lanes of the warp have returned, and with "warp collective
//      at different call sites" when lanes reach different collectives or the same one from
//      different lines. Whole warps may return. (warp_mma.cuh passes its callers' call site on
//      through a defaulted parameter, PCONV_CALL_SITE_PARAMETER; nvcc never sees it.)
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
//      instructions (mma.sync, ldmatrix), cp.async and the counted shared-memory accesses are
//      reached through csrc/cuda/warp_mma.cuh, whose emulator side is warp_mma_emulation.h
//      (included at the end of this header).
//   7. One launch at a time per process (static shared memory is process-wide). Launch limits
//      are checked as on a GPU (1..1024 threads per block, blockDim.z <= 64, gridDim.y and .z
//      <= 65535), and so is the dynamic shared memory size (rule 10).
//   8. cp.async landing moments. A copy reads its source when issued and writes its shared
//      destination at a moment chosen by PCONV_EMULATION_CP_ASYNC (or set_cp_async_landing()),
//      always in the issuing thread, so TSan sees the write as that thread's:
//        issue          when the copy is issued (the earliest legal moment): a stage overwritten
//                       while another warp still reads it (a missing trailing __syncthreads(),
//                       a refill issued before the k-tile's barrier) is a race TSan reports.
//        wait           at the cp_async_wait that covers the copy's group (the latest legal
//                       moment): a read before that wait, or before the __syncthreads() that
//                       follows it, sees stale data (wrong results; TSan reports the race).
//        random[:seed]  (the default, seed 0) each copy on its own: a quarter land when issued,
//                       a quarter at the covering wait, the others at the start of one of the
//                       issuing thread's next 1 to 8 emulated instructions (cp.async, commit,
//                       wait, __syncthreads, __syncwarp, shuffle, ldmatrix, mma, counted shared
//                       access), or at the covering wait if that comes first. The choices come
//                       from a generator seeded with (seed, block, thread), so they do not
//                       depend on thread timing.
//      A correct kernel gives the same results in every mode. Copies that no wait covered and that
//      have not landed are dropped when the thread finishes its block (nothing may read them).
//      Sizes 4, 8 and 16 bytes, both addresses aligned to the size; src-size from 0 (zero fill,
//      the source is not read) to the size (the rest is zero-filled); anything else aborts.
//   9. Bank conflicts. ldmatrix and the accesses made through warp_mma.cuh (cp_async,
//      load_shared_*, store_shared_*) are counted per warp instruction; plain C++ accesses to
//      shared memory are not seen. A warp instruction is the k-th execution of one call site by
//      the lanes of a warp since the last __syncthreads() (so lanes that skip it in divergent code
//      just do not take part). Its lanes are split into phases by access size - 4 bytes: one phase
//      of 32 lanes; 8 bytes: two of 16; 16 bytes (cp.async, ldmatrix rows): four of 8, one per
//      ldmatrix matrix - and a phase takes as many wavefronts as the most distinct 4-byte words
//      it touches in any one of the 32 banks (bank = address / 4 % 32; lanes reading the same word
//      share it). Conflicts = wavefronts - phases. Read them with last_launch_bank_conflicts() or
//      bank_conflicts(kernel) (all launches of a kernel so far); PCONV_EMULATION_BANK_CONFLICTS
//      (or set_bank_conflict_policy()) = count (default: count only), report (print every call
//      site with conflicts to stderr after each launch), fail (report, then abort) or off.
//      Misaligned addresses abort: ldmatrix rows on 16 bytes, cp.async and the shared loads and
//      stores on their access size.
//  10. Shared memory size. A launch aborts if its dynamic shared memory exceeds the emulated
//      architecture's per-block limit (PCONV_EMULATION_ARCH = sm_80 (default, 166912 bytes),
//      sm_86 / sm_89 (101376), sm_87 (166912), sm_90 / sm_100 (232448); or set_architecture()),
//      or exceeds 48 KB (49152 bytes) without cudaFuncSetAttribute(kernel,
//      cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) for at least that size, as on a GPU.
//      The host code calls cudaFuncSetAttribute as it does under nvcc; it returns
//      cudaErrorInvalidValue above the architecture's limit, which cudaDeviceGetAttribute(&bytes,
//      cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) reports. Static __shared__ memory cannot be
//      measured here (rule 4): only the dynamic size is checked, as if the kernel had no static
//      shared memory.
//  11. Races. The emulator does not track memory itself: shared-memory races within a barrier
//      interval are found by ThreadSanitizer, so every emulated kernel test must also run under
//      TSan (tests/emulation_build.py: build_sanitized(), run(..., cp_async=...), and
//      KERNEL_TEST_RUNS for the runs). Recommended for kernel tests: every case under ASan/UBSan
//      with PCONV_EMULATION_CP_ASYNC=wait (stale reads give wrong results), and every case, or at
//      least every kernel variant (stage count, tile shape, data type), under TSan with issue and
//      with random. tests/cuda_emulation/pipeline_selftest.cpp shows each pipeline bug failing
//      under these runs, and is the model mainloop for pipelined kernels. The warp collectives
//      order the memory accesses of a warp's lanes, so a missing __syncwarp() between lanes of one
//      warp is not a race here.
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
#include <source_location>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
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

// The vector types of the 64- and 128-bit shared-memory accesses, aligned as CUDA's.
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
  return {x, y, z, w};
}

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int size_x = 1, unsigned int size_y = 1, unsigned int size_z = 1)
      : x(size_x), y(size_y), z(size_z) {}
};

using cudaStream_t = struct CUstream_st*;

// The part of the CUDA runtime API that kernel host code calls around its launches.
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

inline constexpr int warpSize = 32;
inline thread_local uint3 threadIdx{};
inline thread_local uint3 blockIdx{};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emulation {

// Where kernel code called an intrinsic: the defaulted last parameter of __syncthreads(), the
// shuffles, and the functions of warp_mma.cuh.
using CallSite = std::source_location;

// When a cp.async copy writes shared memory (rule 8 above).
enum class CpAsyncLanding { at_issue, at_wait, random };

// What a launch does with the bank conflicts it counted (rule 9 above).
enum class BankConflictPolicy { off, count, report, fail };

enum class SharedAccessKind : unsigned char { ldmatrix, load, store, cp_async };

// Shared-memory traffic of warp instructions of one kind.
struct SharedAccessCounts {
  unsigned long long instructions = 0;      // warp instructions
  unsigned long long wavefronts = 0;        // shared-memory wavefronts they took
  unsigned long long ideal_wavefronts = 0;  // the phases they had: wavefronts without conflicts
  unsigned long long conflicts() const { return wavefronts - ideal_wavefronts; }
  SharedAccessCounts& operator+=(const SharedAccessCounts& other) {
    instructions += other.instructions;
    wavefronts += other.wavefronts;
    ideal_wavefronts += other.ideal_wavefronts;
    return *this;
  }
};

struct BankConflicts {
  SharedAccessCounts ldmatrix, loads, stores, cp_async;

  SharedAccessCounts& of(SharedAccessKind kind) {
    switch (kind) {
      case SharedAccessKind::ldmatrix: return ldmatrix;
      case SharedAccessKind::load: return loads;
      case SharedAccessKind::store: return stores;
      default: return cp_async;
    }
  }
  SharedAccessCounts total() const {
    SharedAccessCounts sum = ldmatrix;
    sum += loads;
    sum += stores;
    sum += cp_async;
    return sum;
  }
  BankConflicts& operator+=(const BankConflicts& other) {
    ldmatrix += other.ldmatrix;
    loads += other.loads;
    stores += other.stores;
    cp_async += other.cp_async;
    return *this;
  }
};

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

// The emulator's own bookkeeping, compiled once per test: emitted out of line, and without the
// ASan/UBSan checks, which multiply its code (and the compile time of every emulated test) while
// checking no kernel code. TSan still sees it.
#define PCONV_EMULATOR_BOOKKEEPING [[gnu::noinline, gnu::no_sanitize("address,undefined")]]

inline const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

inline bool same_site(const CallSite& a, const CallSite& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

// ---------------------------------------------------------------------------------------------
// Settings, from the environment at first use; the set_* functions below override them between
// launches.

struct Architecture {
  int sm;
  unsigned int max_shared_bytes_per_block_optin;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
};
// CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": 163 KB for 8.0
// and 8.7, 99 KB for 8.6 and 8.9, 227 KB for 9.0 and 10.0.
inline constexpr Architecture kArchitectures[] = {
    {80, 166912}, {86, 101376}, {87, 166912}, {89, 101376}, {90, 232448}, {100, 232448}};
// Per block without cudaFuncAttributeMaxDynamicSharedMemorySize, on every architecture.
inline constexpr unsigned int kDefaultMaxSharedBytesPerBlock = 48 * 1024;

struct Settings {
  CpAsyncLanding landing = CpAsyncLanding::random;
  std::uint64_t seed = 0;
  BankConflictPolicy bank_conflicts = BankConflictPolicy::count;
  Architecture architecture = kArchitectures[0];
};

inline const Architecture* find_architecture(int sm) {
  for (const Architecture& architecture : kArchitectures) {
    if (architecture.sm == sm) return &architecture;
  }
  return nullptr;
}

PCONV_EMULATOR_BOOKKEEPING inline Settings settings_from_environment() {
  Settings settings;
  if (const char* value = std::getenv("PCONV_EMULATION_CP_ASYNC"); value && *value) {
    if (std::strcmp(value, "issue") == 0) {
      settings.landing = CpAsyncLanding::at_issue;
    } else if (std::strcmp(value, "wait") == 0) {
      settings.landing = CpAsyncLanding::at_wait;
    } else if (std::strncmp(value, "random", 6) == 0 && (value[6] == '\0' || value[6] == ':')) {
      settings.landing = CpAsyncLanding::random;
      if (value[6] == ':') {
        char* end = nullptr;
        settings.seed = std::strtoull(value + 7, &end, 10);
        if (end == value + 7 || *end != '\0') {
          fail("PCONV_EMULATION_CP_ASYNC=%s: the seed after random: is not a number", value);
        }
      }
    } else {
      fail("PCONV_EMULATION_CP_ASYNC=%s: expected issue, wait, random or random:<seed>", value);
    }
  }
  if (const char* value = std::getenv("PCONV_EMULATION_BANK_CONFLICTS"); value && *value) {
    constexpr const char* names[] = {"off", "count", "report", "fail"};
    int found = 0;
    while (found < 4 && std::strcmp(names[found], value) != 0) ++found;
    if (found == 4) {
      fail("PCONV_EMULATION_BANK_CONFLICTS=%s: expected off, count, report or fail", value);
    }
    settings.bank_conflicts = BankConflictPolicy(found);
  }
  if (const char* value = std::getenv("PCONV_EMULATION_ARCH"); value && *value) {
    const char* digits = std::strncmp(value, "sm_", 3) == 0 ? value + 3 : value;
    char* end = nullptr;
    const long sm = std::strtol(digits, &end, 10);
    const Architecture* architecture = end != digits && *end == '\0' ? find_architecture(int(sm))
                                                                    : nullptr;
    if (architecture == nullptr) {
      fail("PCONV_EMULATION_ARCH=%s: expected sm_80, sm_86, sm_87, sm_89, sm_90 or sm_100", value);
    }
    settings.architecture = *architecture;
  }
  return settings;
}

// Changed only between launches, by the host thread; pool threads start after the change.
inline Settings& settings() {
  static Settings value = settings_from_environment();
  return value;
}

// ---------------------------------------------------------------------------------------------
// Barriers

// What a thread passed to a barrier: the intrinsic and where the kernel called it.
struct Arrival {
  const char* intrinsic = "";
  CallSite site;
};

// The threads that wait for each other at a barrier: a whole block for __syncthreads(), or one
// warp for the warp intrinsics. A thread that returns from the kernel leaves the group; a barrier
// phase that only some members reached because the others had left is a kernel bug, reported
// instead of hanging, and so is a phase whose members came from different call sites.
class SyncGroup {
 public:
  struct Description {
    const char* early_return;  // "threads of the block reached __syncthreads()"
    const char* member;        // "thread", "lane"
    const char* mismatch;      // "__syncthreads() at different call sites"
    const char* rule;          // what the kernel must do instead
  };

  // Only while no member is running: between blocks. `on_phase(context)` runs after every
  // complete phase, while all members wait.
  void start_block(unsigned int members, const Description& description,
                   void (*on_phase)(void*) = nullptr, void* context = nullptr) {
    members_ = members;
    description_ = &description;
    on_phase_ = on_phase;
    on_phase_context_ = context;
    if (arrivals_.size() < members) arrivals_.resize(members);
    barrier_.emplace(members, PhaseCheck{this});
  }
  // `member`: the caller's index in the group (linear thread id, or lane).
  void sync(unsigned int member, const Arrival& arrival) {
    arrivals_[member] = arrival;
    arrived_.fetch_add(1, std::memory_order_relaxed);
    barrier_->arrive_and_wait();
  }
  void leave() { barrier_->arrive_and_drop(); }
  unsigned int members() const { return members_; }

 private:
  struct PhaseCheck {
    SyncGroup* group;
    void operator()() const noexcept { group->check_phase(); }
  };
  PCONV_EMULATOR_BOOKKEEPING void check_phase() noexcept {
    const unsigned int arrived = arrived_.exchange(0, std::memory_order_relaxed);
    if (arrived == 0) return;  // the last members left
    if (arrived != members_) {
      fail("only %u of %u %s; the others had returned from the kernel (see the rules in "
           "cuda_emulation.h)", arrived, members_, description_->early_return);
    }
    const Arrival& first = arrivals_[0];
    for (unsigned int m = 1; m < members_; ++m) {
      const Arrival& other = arrivals_[m];
      if (!same_site(first.site, other.site)) {
        fail("%s: %s 0 in %s at %s:%u:%u, %s %u in %s at %s:%u:%u; %s (see the rules in "
             "cuda_emulation.h)", description_->mismatch, description_->member, first.intrinsic,
             base_name(first.site.file_name()), unsigned(first.site.line()),
             unsigned(first.site.column()), description_->member, m, other.intrinsic,
             base_name(other.site.file_name()), unsigned(other.site.line()),
             unsigned(other.site.column()), description_->rule);
      }
    }
    if (on_phase_ != nullptr) on_phase_(on_phase_context_);
  }

  unsigned int members_ = 0;
  const Description* description_ = nullptr;
  void (*on_phase_)(void*) = nullptr;
  void* on_phase_context_ = nullptr;
  std::atomic<unsigned int> arrived_{0};
  std::vector<Arrival> arrivals_;  // one per member, written before it arrives
  std::optional<std::barrier<PhaseCheck>> barrier_;
};

inline constexpr SyncGroup::Description kBlockBarrier{
    "threads of the block reached __syncthreads()", "thread",
    "__syncthreads() at different call sites",
    "every thread of a block must reach the same __syncthreads()"};
inline constexpr SyncGroup::Description kWarpBarrier{
    "lanes of the warp reached a warp intrinsic", "lane", "warp collective at different call sites",
    "all 32 lanes of a warp must execute the same warp-collective instruction together"};

// What one lane can publish to the rest of its warp in one collective step: a shuffled value, or
// a lane's A and B registers of a tensor-core instruction.
struct alignas(16) ExchangeSlot {
  std::byte bytes[32];
};

struct Warp {
  SyncGroup group;
  std::array<ExchangeSlot, warpSize> exchange_slots{};  // one per lane
};

// ---------------------------------------------------------------------------------------------
// Bank conflicts (rule 9)

// One shared-memory access of one thread, as the thread logged it.
struct SharedAccess {
  CallSite site;
  std::uintptr_t address;
  unsigned char bytes;
  SharedAccessKind kind;
};

// The counts of one call site (of one kind and access size).
struct SiteCounts {
  CallSite site;
  SharedAccessKind kind;
  unsigned char bytes;
  SharedAccessCounts counts;
};

inline const char* kind_name(SharedAccessKind kind) {
  constexpr const char* names[] = {"ldmatrix", "shared load", "shared store", "cp.async"};
  return names[int(kind)];
}

// The wavefronts one phase of a warp instruction takes: the most distinct 4-byte words in one
// bank. A phase touches at most 32 words (32 lanes x 4 bytes, 16 x 8 or 8 x 16). Plain loops, no
// <algorithm>: this code is compiled into every emulated test, under the sanitizers.
inline unsigned int phase_wavefronts(const std::uintptr_t* words, unsigned int count) {
  unsigned char per_bank[32] = {};
  unsigned int most = 0;
  for (unsigned int i = 0; i < count; ++i) {
    bool seen = false;
    for (unsigned int j = 0; j < i && !seen; ++j) seen = words[j] == words[i];
    if (!seen && ++per_bank[words[i] % 32] > most) most = per_bank[words[i] % 32];
  }
  return most;
}

// The threads' logs of one barrier interval, turned into counts per call site. Runs while no
// thread of the block runs (at a __syncthreads() phase, between blocks, after the launch).
class SharedAccessCounter {
 public:
  explicit SharedAccessCounter(unsigned int threads) : logs_(threads) {}
  PCONV_EMULATOR_BOOKKEEPING ~SharedAccessCounter() {}

  std::vector<SharedAccess>& log(unsigned int linear_id) { return logs_[linear_id]; }
  const std::vector<SiteCounts>& sites() const { return sites_; }

  PCONV_EMULATOR_BOOKKEEPING void count_logs() {
    for (unsigned int first = 0; first < logs_.size(); first += warpSize) {
      const unsigned int threads = unsigned(logs_.size());
      count_warp(first, threads - first < unsigned(warpSize) ? threads - first : warpSize);
    }
  }

 private:
  // One lane's part in a warp instruction: the `occurrence`-th execution of call site `site`.
  struct Keyed {
    std::uint32_t site, occurrence, lane;
    std::uintptr_t address;
  };

  static void zeroed(std::vector<std::uint32_t>& values, std::size_t size) {
    values.resize(size);
    for (std::uint32_t& value : values) value = 0;
  }

  std::uint32_t site_index(const SharedAccess& access) {
    for (std::uint32_t i = 0; i < sites_.size(); ++i) {
      const SiteCounts& s = sites_[i];
      if (s.kind == access.kind && s.bytes == access.bytes && same_site(s.site, access.site)) {
        return i;
      }
    }
    sites_.push_back({access.site, access.kind, access.bytes, {}});
    return std::uint32_t(sites_.size() - 1);
  }

  PCONV_EMULATOR_BOOKKEEPING void count_warp(unsigned int first_thread, unsigned int lanes) {
    // Number every lane's accesses per call site, lane after lane.
    keyed_.clear();
    zeroed(slots_, sites_.size());  // per site: 1 + the highest occurrence of any lane
    for (unsigned int lane = 0; lane < lanes; ++lane) {
      std::vector<SharedAccess>& log = logs_[first_thread + lane];
      if (log.empty()) continue;
      zeroed(occurrences_, sites_.size());
      std::uint32_t site = UINT32_MAX;
      for (const SharedAccess& access : log) {
        if (site == UINT32_MAX || sites_[site].kind != access.kind ||
            sites_[site].bytes != access.bytes || !same_site(sites_[site].site, access.site)) {
          site = site_index(access);
          occurrences_.resize(sites_.size());  // value-initialized: 0
          slots_.resize(sites_.size());
        }
        const std::uint32_t occurrence = occurrences_[site]++;
        if (occurrence >= slots_[site]) slots_[site] = occurrence + 1;
        keyed_.push_back({site, occurrence, lane, access.address});
      }
      log.clear();
    }
    if (keyed_.empty()) return;
    // Group them by (site, occurrence) with a counting sort, which keeps the lanes in order.
    std::uint32_t instructions = 0;
    for (std::uint32_t& slot : slots_) {
      const std::uint32_t count = slot;
      slot = instructions;  // now the first group of the site
      instructions += count;
    }
    zeroed(group_starts_, instructions + 1);
    for (const Keyed& k : keyed_) ++group_starts_[slots_[k.site] + k.occurrence + 1];
    for (std::uint32_t g = 0; g < instructions; ++g) group_starts_[g + 1] += group_starts_[g];
    grouped_.resize(keyed_.size());
    fill_.resize(instructions);
    for (std::uint32_t g = 0; g < instructions; ++g) fill_[g] = group_starts_[g];
    for (const Keyed& k : keyed_) grouped_[fill_[slots_[k.site] + k.occurrence]++] = k;
    for (std::uint32_t g = 0; g < instructions; ++g) {
      if (group_starts_[g] < group_starts_[g + 1]) {
        count_instruction(group_starts_[g], group_starts_[g + 1]);
      }
    }
  }

  // grouped_[begin, end): the lanes of one warp instruction, in lane order.
  PCONV_EMULATOR_BOOKKEEPING void count_instruction(std::uint32_t begin, std::uint32_t end) {
    SiteCounts& site = sites_[grouped_[begin].site];
    const unsigned int phase_lanes = 128u / site.bytes;
    const unsigned int words_per_access = site.bytes / 4u;
    ++site.counts.instructions;
    std::uintptr_t words[32];
    for (std::uint32_t i = begin; i < end;) {
      const unsigned int phase = grouped_[i].lane / phase_lanes;
      unsigned int count = 0;
      for (; i < end && grouped_[i].lane / phase_lanes == phase; ++i) {
        for (unsigned int w = 0; w < words_per_access; ++w) {
          words[count++] = grouped_[i].address / 4 + w;
        }
      }
      site.counts.wavefronts += phase_wavefronts(words, count);
      ++site.counts.ideal_wavefronts;
    }
  }

  std::vector<std::vector<SharedAccess>> logs_;  // one per thread of the block
  std::vector<SiteCounts> sites_;
  std::vector<Keyed> keyed_, grouped_;
  std::vector<std::uint32_t> occurrences_, slots_, group_starts_, fill_;
};

// ---------------------------------------------------------------------------------------------
// Launches

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

// A kernel function, as the key of its attributes and counts.
using KernelId = void (*)();

struct KernelRecord {
  KernelId kernel;
  int max_dynamic_shared_bytes;  // -1: cudaFuncAttributeMaxDynamicSharedMemorySize not set
  BankConflicts bank_conflicts;  // of all its launches
};

// Host-side state of the process, touched only by the host thread between launches.
struct Registry {
  std::vector<KernelRecord> kernels;
  BankConflicts last_launch;

  KernelRecord& record(KernelId kernel) {
    for (KernelRecord& record : kernels) {
      if (record.kernel == kernel) return record;
    }
    kernels.push_back({kernel, -1, {}});
    return kernels.back();
  }
};
inline Registry& registry() {
  static Registry value;
  return value;
}

PCONV_EMULATOR_BOOKKEEPING inline void check_dynamic_shared_memory(KernelId kernel,
                                                                   std::size_t bytes) {
  const Architecture& architecture = settings().architecture;
  if (bytes > architecture.max_shared_bytes_per_block_optin) {
    fail("launch: %zu bytes of dynamic shared memory exceed the sm_%d limit of %u bytes per "
         "block (PCONV_EMULATION_ARCH chooses the architecture)", bytes, architecture.sm,
         architecture.max_shared_bytes_per_block_optin);
  }
  const int attribute = registry().record(kernel).max_dynamic_shared_bytes;
  const std::size_t allowed = attribute >= 0 ? std::size_t(attribute)
                                             : kDefaultMaxSharedBytesPerBlock;
  if (bytes > allowed) {
    fail("launch: %zu bytes of dynamic shared memory, but the kernel allows %zu; above 48 KB the "
         "host code must first call cudaFuncSetAttribute(kernel, "
         "cudaFuncAttributeMaxDynamicSharedMemorySize, %zu) or more", bytes, allowed, bytes);
  }
}

// The state one launch shares among the threads of its pool.
class Launch {
 public:
  PCONV_EMULATOR_BOOKKEEPING Launch(dim3 grid, dim3 block, std::size_t dynamic_shared_bytes)
      : grid_(grid),
        block_(block),
        threads_per_block_(block.x * block.y * block.z),
        block_boundary_(threads_per_block_, PrepareBlock{this}),
        warps_((threads_per_block_ + warpSize - 1) / warpSize),
        shared_accesses_(threads_per_block_),
        dynamic_shared_bytes_(dynamic_shared_bytes),
        dynamic_shared_(static_cast<std::byte*>(
            ::operator new(dynamic_shared_bytes, kDynamicSharedAlignment))) {}

  unsigned int threads_per_block() const { return threads_per_block_; }
  void* dynamic_shared_memory() const { return dynamic_shared_.get(); }
  void sync_block(unsigned int linear_id, CallSite site) {
    block_sync_.sync(linear_id, {"__syncthreads()", site});
  }
  std::vector<SharedAccess>& shared_access_log(unsigned int linear_id) {
    return shared_accesses_.log(linear_id);
  }
  // After the last block: count what it logged and return the counts per call site.
  const std::vector<SiteCounts>& count_shared_accesses() {
    shared_accesses_.count_logs();
    return shared_accesses_.sites();
  }

  // The whole life of pool thread `linear_id`: its thread of every block in turn.
  void run_thread(unsigned int linear_id, const std::function<void()>& kernel_body);

 private:
  struct PrepareBlock {
    Launch* launch;
    void operator()() const noexcept { launch->prepare_block(); }
  };
  static void count_at_barrier(void* launch) {
    static_cast<Launch*>(launch)->shared_accesses_.count_logs();
  }
  // Runs once all threads finished the previous block, before any starts the next.
  PCONV_EMULATOR_BOOKKEEPING void prepare_block() {
    shared_accesses_.count_logs();
    std::memset(dynamic_shared_.get(), 0xCD, dynamic_shared_bytes_);
    block_sync_.start_block(threads_per_block_, kBlockBarrier, count_at_barrier, this);
    constexpr unsigned int lanes_per_warp = warpSize;
    for (unsigned int w = 0; w < warps_.size(); ++w) {
      const unsigned int lanes = std::min(lanes_per_warp, threads_per_block_ - w * lanes_per_warp);
      warps_[w].group.start_block(lanes, kWarpBarrier);
    }
  }

  const dim3 grid_;
  const dim3 block_;
  const unsigned int threads_per_block_;
  std::barrier<PrepareBlock> block_boundary_;
  SyncGroup block_sync_;
  std::vector<Warp> warps_;
  SharedAccessCounter shared_accesses_;
  const std::size_t dynamic_shared_bytes_;
  const std::unique_ptr<std::byte, AlignedDelete> dynamic_shared_;
};

// ---------------------------------------------------------------------------------------------
// cp.async (rule 8)

// The cp.async copies of one thread that have not landed yet. The source is read when the copy is
// issued; the destination is written at the moment the landing mode picks, by this thread.
class AsyncCopies {
 public:
  static constexpr std::size_t kMaxBytes = 16;

  // Before the thread runs a block: the random choices depend on (seed, block, thread) only.
  void start_block(std::uint64_t block, unsigned int linear_id) {
    const Settings& current = settings();
    landing_ = current.landing;
    random_state_ = current.seed ^ (block * 0x9e3779b97f4a7c15ull) ^
                    (std::uint64_t(linear_id) * 0xc2b2ae3d27d4eb4full);
    instruction_ = 0;
    next_landing_ = kAtWait;
  }

  // The start of an emulated instruction of this thread: a random landing moment.
  void at_instruction() {
    ++instruction_;
    if (instruction_ < next_landing_) return;
    next_landing_ = kAtWait;
    for (Copy& copy : pending_) {
      if (copy.land_at <= instruction_) {
        land(copy);
      } else {
        next_landing_ = std::min(next_landing_, copy.land_at);
      }
    }
  }

  // Copies `source_bytes` of `bytes` from `source` and zero-fills the rest.
  void issue(void* destination, const void* source, std::size_t bytes, std::size_t source_bytes) {
    Copy copy{destination, kAtWait, bytes, {}};
    if (source_bytes != 0) std::memcpy(copy.data.data(), source, source_bytes);
    if (landing_ == CpAsyncLanding::random) {
      const std::uint64_t choice = next_random();
      if (choice % 4 == 0) {
        copy.land_at = instruction_;  // now
      } else if (choice % 4 != 1) {
        copy.land_at = instruction_ + 1 + (choice >> 8) % 8;
        next_landing_ = std::min(next_landing_, copy.land_at);
      }
    } else if (landing_ == CpAsyncLanding::at_issue) {
      copy.land_at = instruction_;
    }
    if (copy.land_at == instruction_) {
      land(copy);  // in no group any more: the group bookkeeping counts pending copies only
      return;
    }
    pending_.push_back(copy);
  }
  void commit_group() { group_ends_.push_back(pending_.size()); }
  // cp.async.wait_group: lands every committed group but the `newest_pending` newest ones.
  void wait_group(std::size_t newest_pending) {
    if (group_ends_.size() <= newest_pending) return;
    const std::size_t landed_groups = group_ends_.size() - newest_pending;
    const std::size_t landed = group_ends_[landed_groups - 1];
    for (std::size_t i = 0; i < landed; ++i) land(pending_[i]);
    pending_.erase(pending_.begin(), pending_.begin() + landed);
    group_ends_.erase(group_ends_.begin(), group_ends_.begin() + landed_groups);
    for (std::size_t& end : group_ends_) end -= landed;
  }
  void drop_all() {
    pending_.clear();
    group_ends_.clear();
  }

 private:
  static constexpr std::uint64_t kAtWait = UINT64_MAX;

  struct Copy {
    void* destination;  // null once landed
    std::uint64_t land_at;  // an instruction_ count, or kAtWait
    std::size_t bytes;
    std::array<std::byte, kMaxBytes> data;
  };

  static void land(Copy& copy) {
    if (copy.destination == nullptr) return;
    std::memcpy(copy.destination, copy.data.data(), copy.bytes);
    copy.destination = nullptr;
  }
  std::uint64_t next_random() {  // splitmix64
    std::uint64_t z = (random_state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  CpAsyncLanding landing_ = CpAsyncLanding::at_wait;
  std::uint64_t random_state_ = 0;
  std::uint64_t instruction_ = 0;
  std::uint64_t next_landing_ = kAtWait;
  std::vector<Copy> pending_;             // landed ones stay until a wait covers them
  std::vector<std::size_t> group_ends_;  // pending_.size() at each commit, oldest first
};
inline thread_local AsyncCopies this_thread_async_copies;

// Which launch, warp and lane the calling pool thread belongs to; empty outside a kernel.
struct ThreadContext {
  Launch* launch = nullptr;
  Warp* warp = nullptr;
  unsigned int lane = 0;
  unsigned int linear_id = 0;
  std::vector<SharedAccess>* shared_access_log = nullptr;  // null: bank conflicts are off
};
inline thread_local ThreadContext this_thread_context;

inline void Launch::run_thread(unsigned int linear_id, const std::function<void()>& kernel_body) {
  blockDim = block_;
  gridDim = grid_;
  threadIdx = {linear_id % block_.x, linear_id / block_.x % block_.y,
               linear_id / (block_.x * block_.y)};
  const bool count_accesses = settings().bank_conflicts != BankConflictPolicy::off;
  this_thread_context = {this, &warps_[linear_id / warpSize], linear_id % warpSize, linear_id,
                         count_accesses ? &shared_access_log(linear_id) : nullptr};
  const unsigned long long blocks_per_layer = 1ull * grid_.x * grid_.y;
  const unsigned long long blocks = blocks_per_layer * grid_.z;
  for (unsigned long long b = 0; b < blocks; ++b) {
    block_boundary_.arrive_and_wait();
    blockIdx = {static_cast<unsigned int>(b % grid_.x),
                static_cast<unsigned int>(b / grid_.x % grid_.y),
                static_cast<unsigned int>(b / blocks_per_layer)};
    this_thread_async_copies.start_block(b, linear_id);
    kernel_body();
    this_thread_async_copies.drop_all();
    this_thread_context.warp->group.leave();
    block_sync_.leave();
  }
  this_thread_context = {};
}

inline Launch& current_launch(const char* caller) {
  if (this_thread_context.launch == nullptr) {
    fail("%s called outside a kernel run by cuda_emulation::launch", caller);
  }
  return *this_thread_context.launch;
}

// The start of every emulated instruction: where a random cp.async landing may happen.
inline void at_instruction() { this_thread_async_copies.at_instruction(); }

// Records a shared-memory access of the calling thread for the bank-conflict counts.
inline void log_shared_access(SharedAccessKind kind, const void* address, std::size_t bytes,
                              CallSite site) {
  if (std::vector<SharedAccess>* log = this_thread_context.shared_access_log) {
    log->push_back({site, reinterpret_cast<std::uintptr_t>(address), (unsigned char)bytes, kind});
  }
}

inline Warp& warp_for_intrinsic(unsigned int mask, const char* caller) {
  const Launch& launch = current_launch(caller);
  if (mask != 0xffffffffu) fail("%s: only the full mask 0xffffffff is supported", caller);
  Warp& warp = *this_thread_context.warp;
  if (warp.group.members() != warpSize) {
    fail("%s used in a partial warp of %u lanes (block of %u threads); a full-mask warp "
         "intrinsic needs all 32 lanes", caller, warp.group.members(), launch.threads_per_block());
  }
  at_instruction();
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
// barriers: after all lanes wrote (which checks that they came from one call site), and after all
// lanes read, before a next collective overwrites the slots. The caller has checked that the warp
// may run a collective (warp_for_intrinsic).
template <typename T, typename Read>
auto warp_collective(const T& value, Read&& read, const Arrival& arrival) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(ExchangeSlot),
                "a lane publishes a trivially copyable value of at most 32 bytes");
  Warp& warp = *this_thread_context.warp;
  const unsigned int lane = this_thread_context.lane;
  std::memcpy(warp.exchange_slots[lane].bytes, &value, sizeof(T));
  warp.group.sync(lane, arrival);
  const auto published = [&warp](unsigned int source) {
    T lane_value;
    std::memcpy(&lane_value, warp.exchange_slots[source].bytes, sizeof(T));
    return lane_value;
  };
  auto result = read(published);
  warp.group.sync(lane, arrival);
  return result;
}

template <typename T>
T exchange(T value, unsigned int source_lane, const Arrival& arrival) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffles take values of at most 8 bytes");
  return warp_collective(
      value, [source_lane](const auto& published) { return published(source_lane); }, arrival);
}

// After a launch: the counts into the registry, and the report or abort the policy asks for.
PCONV_EMULATOR_BOOKKEEPING inline void finish_bank_conflicts(KernelId kernel,
                                                             const std::vector<SiteCounts>& sites) {
  BankConflicts totals;
  for (const SiteCounts& site : sites) totals.of(site.kind) += site.counts;
  registry().last_launch = totals;
  registry().record(kernel).bank_conflicts += totals;
  const BankConflictPolicy policy = settings().bank_conflicts;
  if (totals.total().conflicts() == 0 ||
      (policy != BankConflictPolicy::report && policy != BankConflictPolicy::fail)) {
    return;
  }
  std::fprintf(stderr, "cuda_emulation: bank conflicts in a launch, by call site:\n");
  for (const SiteCounts& site : sites) {
    if (site.counts.conflicts() == 0) continue;
    std::fprintf(stderr,
                 "  %s of %u bytes at %s:%u:%u: %llu warp instructions took %llu wavefronts "
                 "where %llu suffice (%llu extra)\n",
                 kind_name(site.kind), unsigned(site.bytes), base_name(site.site.file_name()),
                 unsigned(site.site.line()), unsigned(site.site.column()),
                 site.counts.instructions, site.counts.wavefronts, site.counts.ideal_wavefronts,
                 site.counts.conflicts());
  }
  if (policy == BankConflictPolicy::fail) {
    fail("bank conflicts: %llu extra wavefronts (PCONV_EMULATION_BANK_CONFLICTS=fail)",
         totals.total().conflicts());
  }
}

// Runs `kernel_body` in every thread of every block of the grid, and returns when all are done.
PCONV_EMULATOR_BOOKKEEPING inline void run_grid(KernelId kernel, dim3 grid, dim3 block,
                                                std::size_t dynamic_shared_bytes,
                                                const std::function<void()>& kernel_body) {
  check_launch_configuration(grid, block);
  check_dynamic_shared_memory(kernel, dynamic_shared_bytes);
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
  finish_bank_conflicts(kernel, state.count_shared_accesses());
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
  detail::run_grid(reinterpret_cast<detail::KernelId>(kernel), grid, block, dynamic_shared_bytes,
                   [&] { std::apply(kernel, parameters); });
}

// Settings (rules 8 to 10); call between launches. They override the environment variables.
inline void set_cp_async_landing(CpAsyncLanding landing) { detail::settings().landing = landing; }
inline void set_cp_async_landing(CpAsyncLanding landing, std::uint64_t seed) {
  detail::settings().landing = landing;
  detail::settings().seed = seed;
}
inline CpAsyncLanding cp_async_landing() { return detail::settings().landing; }
inline void set_bank_conflict_policy(BankConflictPolicy policy) {
  detail::settings().bank_conflicts = policy;
}
// sm: 80, 86, 87, 89, 90 or 100.
inline void set_architecture(int sm) {
  const detail::Architecture* architecture = detail::find_architecture(sm);
  if (architecture == nullptr) detail::fail("set_architecture(%d): unknown architecture", sm);
  detail::settings().architecture = *architecture;
}

// Bank conflicts of the last launch, and of all launches of `kernel` so far (rule 9).
inline BankConflicts last_launch_bank_conflicts() { return detail::registry().last_launch; }
template <typename... Params>
BankConflicts bank_conflicts(void (*kernel)(Params...)) {
  return detail::registry().record(reinterpret_cast<detail::KernelId>(kernel)).bank_conflicts;
}

}  // namespace cuda_emulation

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) as the CUDA
// runtime's C++ overload takes it; the launch checks against it (rule 10).
template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                 int value) {
  namespace detail = cuda_emulation::detail;
  if (attribute == cudaFuncAttributePreferredSharedMemoryCarveout) {
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  }
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      unsigned(value) > detail::settings().architecture.max_shared_bytes_per_block_optin) {
    return cudaErrorInvalidValue;
  }
  detail::registry().record(reinterpret_cast<detail::KernelId>(kernel)).max_dynamic_shared_bytes =
      value;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  const cuda_emulation::detail::Architecture& architecture =
      cuda_emulation::detail::settings().architecture;
  if (device != 0) return cudaErrorInvalidValue;
  switch (attribute) {
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = int(cuda_emulation::detail::kDefaultMaxSharedBytesPerBlock);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(architecture.max_shared_bytes_per_block_optin);
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = architecture.sm / 10;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = architecture.sm % 10;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid argument";
}

inline void __syncthreads(cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  cuda_emulation::detail::Launch& launch =
      cuda_emulation::detail::current_launch("__syncthreads()");
  cuda_emulation::detail::at_instruction();
  launch.sync_block(cuda_emulation::detail::this_thread_context.linear_id, site);
}

inline void __syncwarp(unsigned int mask = 0xffffffffu,
                       cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  cuda_emulation::detail::warp_for_intrinsic(mask, "__syncwarp()")
      .group.sync(cuda_emulation::detail::this_thread_context.lane, {"__syncwarp()", site});
}

template <typename T>
T __shfl_sync(unsigned int mask, T var, int srcLane, int width = warpSize,
              cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(
      var, (lane & ~(segment - 1)) | (static_cast<unsigned int>(srcLane) & (segment - 1)),
      {"__shfl_sync()", site});
}

template <typename T>
T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                 cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_up_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(var, lane % segment >= delta ? lane - delta : lane,
                                          {"__shfl_up_sync()", site});
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                   cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  const unsigned int lane =
      cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_down_sync()");
  const auto segment = static_cast<unsigned int>(width);
  return cuda_emulation::detail::exchange(
      var, delta < segment - lane % segment ? lane + delta : lane, {"__shfl_down_sync()", site});
}

// A source lane past the caller's segment yields the caller's own value; earlier segments are
// readable, as on hardware.
template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = warpSize,
                  cuda_emulation::CallSite site = cuda_emulation::CallSite::current()) {
  const unsigned int lane = cuda_emulation::detail::shuffle_lane(mask, width, "__shfl_xor_sync()");
  const unsigned int segment_last_lane = lane | (static_cast<unsigned int>(width) - 1);
  const unsigned int source = lane ^ static_cast<unsigned int>(laneMask);
  return cuda_emulation::detail::exchange(var, source <= segment_last_lane ? source : lane,
                                          {"__shfl_xor_sync()", site});
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
