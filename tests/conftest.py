"""Session-wide test setup.

The Triton kernels only run on CPU tensors in triton's interpreter, and triton decides
that when it decorates a kernel, i.e. at the first import of a kernel module. Several test
modules (and bench/ code they import) may import the kernels before tests/test_kernels.py
runs, so the interpreter is switched on here, before any test module is imported. On CPU
the engine's dispatch still picks SDPA unless a test forces Triton.
"""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture()
def http(server):
    """An HTTP client of the module's live `server` fixture; every test leaves no session behind."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
    for sid in list(server.manager.sessions):
        server.call(server.manager.close(sid, "test cleanup"))
