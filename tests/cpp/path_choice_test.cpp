// The CUDA path choice (csrc/path_choice.h) with a fake timer: which calls time, what they choose,
// what later calls reuse, and that concurrent first calls time once. Prints PASS or FAIL lines.
#include "path_choice.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>

using partialconv::CallConditions;
using partialconv::Choice;
using partialconv::Implementation;
using partialconv::MeasuredChoices;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what);
  if (!ok) ++failures;
}

// Times an implementation as `fused_s` or `vendor_s` seconds and counts its calls.
struct FakeTimer {
  double fused_s, vendor_s;
  std::atomic<int> calls{0};
  std::chrono::milliseconds delay{0};
  double operator()(Implementation implementation) {
    ++calls;
    if (delay.count() > 0) std::this_thread::sleep_for(delay);
    return implementation == Implementation::kFused ? fused_s : vendor_s;
  }
};

constexpr int kTimingCalls = 2 * (1 + MeasuredChoices::kTimedRuns);  // one untimed + timed runs, each path

CallConditions benchmark_on() {
  CallConditions call;
  call.benchmark = true;
  return call;
}

}  // namespace

int main() {
  const auto vendor = Implementation::kVendor, fused = Implementation::kFused;
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    CallConditions call = benchmark_on();
    call.forced = fused;
    check(choices.choose("k", call, std::ref(timer)).implementation == fused && timer.calls == 0,
          "a forced path is taken, untimed");
    call.forced = vendor;
    check(choices.choose("k", call, std::ref(timer)).implementation == vendor && timer.calls == 0,
          "a forced vendor path is taken, untimed");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    CallConditions call = benchmark_on();
    call.fused_supported = false;
    call.unsupported_reason = "too large";
    const Choice choice = choices.choose("k", call, std::ref(timer));
    check(choice.implementation == vendor && timer.calls == 0 && choice.reason.find("too large") != std::string::npos,
          "shapes the fused kernels do not take go to the vendor path, untimed, with the reason");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    CallConditions call = benchmark_on();
    call.deterministic = true;
    bool same = true;
    for (int i = 0; i < 3; ++i) same &= choices.choose("k", call, std::ref(timer)).implementation == partialconv::kDefaultImplementation;
    check(same && timer.calls == 0, "deterministic mode takes the default on every call, never timed");
    call.deterministic = false;
    choices.choose("k", call, std::ref(timer));  // measured now: fused
    call.deterministic = true;
    check(choices.choose("k", call, std::ref(timer)).implementation == partialconv::kDefaultImplementation,
          "deterministic mode ignores a measurement made outside it (no switching)");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    CallConditions call;  // benchmark off
    check(choices.choose("k", call, std::ref(timer)).implementation == partialconv::kDefaultImplementation &&
              timer.calls == 0,
          "benchmark mode off: the default, untimed");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    const CallConditions call = benchmark_on();
    const Choice first = choices.choose("k", call, std::ref(timer));
    check(first.implementation == fused && timer.calls == kTimingCalls, "the first call times both and takes the faster (fused)");
    const Choice second = choices.choose("k", call, std::ref(timer));
    check(second.implementation == fused && timer.calls == kTimingCalls && second.reason == first.reason,
          "a later call with the same key reuses the measurement, untimed");
    FakeTimer slow_fused{3e-3, 2e-3};
    check(choices.choose("other", call, std::ref(slow_fused)).implementation == vendor &&
              slow_fused.calls == kTimingCalls,
          "another key is timed on its own first call (vendor faster)");
    check(choices.predict("k", call).implementation == fused && choices.predict("new", call).implementation ==
                                                                    partialconv::kDefaultImplementation,
          "predict reports the measured choice, or the default, and times nothing");
    choices.clear();
    choices.choose("k", call, std::ref(timer));
    check(timer.calls == 2 * kTimingCalls, "clear() forgets the measurements");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    CallConditions call = benchmark_on();
    call.may_time = false;  // under CUDA graph capture
    check(choices.choose("k", call, std::ref(timer)).implementation == partialconv::kDefaultImplementation &&
              timer.calls == 0,
          "under graph capture an unmeasured key takes the default, untimed");
    call.may_time = true;
    choices.choose("k", call, std::ref(timer));
    call.may_time = false;
    check(choices.choose("k", call, std::ref(timer)).implementation == fused && timer.calls == kTimingCalls,
          "under graph capture a measured key takes its measurement");
  }
  {
    MeasuredChoices choices;
    const CallConditions call = benchmark_on();
    bool thrown = false;
    try {
      choices.choose("k", call, [](Implementation) -> double { throw std::runtime_error("launch failed"); });
    } catch (const std::runtime_error&) {
      thrown = true;
    }
    FakeTimer timer{1e-3, 2e-3};
    check(thrown && choices.choose("k", call, std::ref(timer)).implementation == fused && timer.calls == kTimingCalls,
          "a failed timing propagates its error and the next call times again");
  }
  {
    MeasuredChoices choices;
    FakeTimer timer{1e-3, 2e-3};
    timer.delay = std::chrono::milliseconds(5);
    const CallConditions call = benchmark_on();
    std::vector<std::thread> threads;
    std::atomic<int> fused_or_default{0};
    for (int t = 0; t < 8; ++t)
      threads.emplace_back([&] {
        const Implementation got = choices.choose("k", call, std::ref(timer)).implementation;
        if (got == fused || got == partialconv::kDefaultImplementation) ++fused_or_default;
      });
    for (std::thread& thread : threads) thread.join();
    check(timer.calls == kTimingCalls && fused_or_default == 8,
          "concurrent first calls: one thread times, the others take the default or the measurement");
  }
  std::printf("%s\n", failures == 0 ? "ALL PASS" : "SOME FAIL");
  return failures == 0 ? 0 : 1;
}
