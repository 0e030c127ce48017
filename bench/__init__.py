"""Speed comparison of partialconv_cuda against the usual ways of computing a partial convolution;
run it with `python -m bench` (see bench/README.md)."""
import os
import sys

# Pin OpenMP threads to cores unless the caller chose otherwise. Unpinned, the two threads of a
# 2-core VM were seen sharing one core for seconds at a time, and a 0.5 ms convolution then took
# 32 ms. OpenMP reads these when torch loads it, so they only apply if torch is not loaded yet.
THREADS_PINNED = "torch" not in sys.modules or "OMP_PROC_BIND" in os.environ
os.environ.setdefault("OMP_PROC_BIND", "true")
os.environ.setdefault("OMP_PLACES", "cores")
