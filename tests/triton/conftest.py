"""Triton tests run generated kernels under the interpreter on a CPU machine."""
import os

import pytest

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))
