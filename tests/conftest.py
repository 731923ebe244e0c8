"""Test-wide setup. Triton kernels run under Triton's CPU interpreter in the tests; the
variable must be set before any kernel module is imported (``triton.jit`` reads it)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
