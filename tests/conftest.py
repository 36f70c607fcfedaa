"""Session-wide test setup.

The Triton kernels only run on CPU tensors in triton's interpreter, and triton decides
that when it decorates a kernel, i.e. at the first import of a kernel module. Several test
modules (and bench/ code they import) may import the kernels before tests/test_kernels.py
runs, so the interpreter is switched on here, before any test module is imported. On CPU
the engine's dispatch still picks SDPA unless a test forces Triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
