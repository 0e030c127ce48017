// The per-call choice between the two implementations of a pass on CUDA: the fused kernels
// (csrc/cuda) or the vendor path (vendor_path.h). Torch-free, so that tests/cpp runs it with a fake
// timer.
//
// The rule, in order:
//   1. PARTIALCONV_CUDA_PATH=fused|vendor forces one (a forced fused path on shapes the fused
//      kernels do not take is the caller's error to raise).
//   2. Shapes the fused kernels do not take go to the vendor path.
//   3. Under torch.use_deterministic_algorithms(True): the default, never timed, so that a
//      deterministic run never switches path between calls.
//   4. With partialconv_cuda.backends.benchmark = True: the faster of the two, timed on the first
//      call of each key (shape, strides, dtype, mask kind, device, ...) and cached. A call that may
//      not time (under CUDA graph capture; or while another thread times the same key) takes the
//      cached choice, or the default. torch.compile traces with fake tensors, which never reach
//      this code; the compiled graph's calls choose like eager ones.
//   5. Otherwise the default: the vendor path, whose cost is never above the pure-PyTorch layer's
//      (the same vendor convolution, no mask convolution, fewer elementwise passes), until GPU
//      measurements show where the fused kernels win (bench: ours_fused, ours_vendor).
#pragma once

#include <algorithm>
#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>

namespace partialconv {

enum class Implementation { kFused, kVendor };

// What the caller knows of one call.
struct CallConditions {
  std::optional<Implementation> forced;  // from PARTIALCONV_CUDA_PATH
  bool fused_supported = true;
  std::string unsupported_reason;        // why not, when !fused_supported
  bool deterministic = false;            // torch.are_deterministic_algorithms_enabled()
  bool benchmark = false;                // partialconv_cuda.backends.benchmark
  bool may_time = true;                  // false under CUDA graph capture
};

struct Choice {
  Implementation implementation;
  std::string reason;
};

constexpr Implementation kDefaultImplementation = Implementation::kVendor;

// The cache of measured choices, one per key; thread-safe. Timing runs outside the lock, and one
// thread at a time times a key.
class MeasuredChoices {
 public:
  // time(implementation) runs the pass once with that implementation and returns the seconds it
  // took; the pass writes the call's outputs, so whichever ran last leaves them correct.
  Choice choose(const std::string& key, const CallConditions& call,
                const std::function<double(Implementation)>& time) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (std::optional<Choice> decided = decide_locked(key, call)) return *decided;
      timing_.insert(key);
    }
    const TimingGuard guard{this, key};
    // Each implementation once untimed (first-call costs: allocations, the vendor's own algorithm
    // search), then the fastest of kTimedRuns.
    double best[2] = {0, 0};
    for (const Implementation implementation : {Implementation::kFused, Implementation::kVendor}) {
      time(implementation);
      double fastest = time(implementation);
      for (int run = 1; run < kTimedRuns; ++run) fastest = std::min(fastest, time(implementation));
      best[int(implementation)] = fastest;
    }
    std::ostringstream reason;
    reason << "measured on the first call: fused " << best[0] * 1e6 << " us, vendor " << best[1] * 1e6 << " us";
    const Choice choice{best[0] <= best[1] ? Implementation::kFused : Implementation::kVendor, reason.str()};
    const std::lock_guard<std::mutex> lock(mutex_);
    measured_.emplace(key, choice);
    return choice;
  }

  // What choose() would take without timing: the measured choice, or what the rule says (for
  // forward_path, which runs nothing).
  Choice predict(const std::string& key, const CallConditions& call) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (std::optional<Choice> decided = decide_locked(key, call)) return *decided;
    return {kDefaultImplementation, "the default until measured: the first call with these arguments times both"};
  }

  void clear() {
    const std::lock_guard<std::mutex> lock(mutex_);
    measured_.clear();
  }

  static constexpr int kTimedRuns = 3;

 private:
  // Removes a key from timing_ when its timing ends, also by an exception.
  struct TimingGuard {
    MeasuredChoices* choices;
    std::string key;
    ~TimingGuard() {
      const std::lock_guard<std::mutex> lock(choices->mutex_);
      choices->timing_.erase(key);
    }
  };

  // The choice when it needs no timing now; nullopt when this call should time. mutex_ held.
  std::optional<Choice> decide_locked(const std::string& key, const CallConditions& call) const {
    if (call.forced) return Choice{*call.forced, "forced by PARTIALCONV_CUDA_PATH"};
    if (!call.fused_supported)
      return Choice{Implementation::kVendor, "the fused kernels do not take this call: " + call.unsupported_reason};
    if (call.deterministic)
      return Choice{kDefaultImplementation, "the default (deterministic algorithms: never timed, never switched)"};
    if (!call.benchmark) return Choice{kDefaultImplementation, "the default (partialconv_cuda.backends.benchmark is off)"};
    if (const auto found = measured_.find(key); found != measured_.end()) return found->second;
    if (!call.may_time)
      return Choice{kDefaultImplementation, "the default (not measured yet, and no timing under CUDA graph capture)"};
    if (timing_.count(key) != 0) return Choice{kDefaultImplementation, "the default (another thread is timing this call)"};
    return std::nullopt;
  }

  mutable std::mutex mutex_;
  std::map<std::string, Choice> measured_;
  std::set<std::string> timing_;
};

// partialconv_cuda.backends.benchmark, and the measurements of this process.
inline std::atomic<bool>& benchmark_enabled() {
  static std::atomic<bool> enabled{false};
  return enabled;
}

inline MeasuredChoices& measured_choices() {
  static MeasuredChoices choices;
  return choices;
}

}  // namespace partialconv
