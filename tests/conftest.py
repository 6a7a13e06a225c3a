"""Settings for the whole test session."""

import os

# One torch thread per test process, and per pipeline subprocess a test starts (they inherit it):
# pytest-xdist (`-n auto`) already runs one process per core, and torch's default of a thread per core
# in each of them oversubscribes the cores (the torch-heavy test files ran over twice as long). An explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
