"""Reliability tests write generated kernels to a scratch cache, never the user's."""
import pytest


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))
