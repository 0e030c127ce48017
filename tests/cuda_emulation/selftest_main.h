// The main() of the emulation self-tests. `selftest` runs every check and prints a PASS or FAIL
// line for each (exit status 0 only if all pass); `selftest <misuse>` launches one named kernel
// bug, which the emulator must turn into an abort with a message.
#pragma once

#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>

namespace cuda_emulation {

using SelfCheck = std::pair<const char*, bool (*)()>;

// launch_misuse(name) launches the named misuse and returns true (it returns at all only if the
// emulator missed the bug), or returns false for an unknown name.
inline int selftest_main(int argc, char** argv, bool (*launch_misuse)(const std::string&),
                         std::initializer_list<SelfCheck> checks) {
  if (argc == 2) {
    if (!launch_misuse(argv[1])) {
      std::fprintf(stderr, "unknown misuse %s\n", argv[1]);
      return 2;
    }
    std::fprintf(stderr, "misuse %s was not caught\n", argv[1]);
    return 1;
  }
  bool all_passed = true;
  for (const auto& [name, check] : checks) {
    const bool passed = check();
    std::printf("%s: %s\n", passed ? "PASS" : "FAIL", name);
    all_passed = all_passed && passed;
  }
  return all_passed ? 0 : 1;
}

}  // namespace cuda_emulation
