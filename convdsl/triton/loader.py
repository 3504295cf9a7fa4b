"""Kernel source → a Triton kernel object, through a file on disk.

Triton reads a kernel's source with `inspect`, so each generated module is
written to the cache directory (atomically, named by the hash of its text)
and imported from there. Without a GPU the module is imported with
TRITON_INTERPRET=1, which makes `@triton.jit` build an interpreted kernel
that runs on CPU tensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], object] = {}


def cache_dir() -> Path:
    root = os.environ.get("CONVDSL_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "convdsl" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _write_atomically(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def interpret_default() -> bool:
    """Interpret when asked to, or when there is no GPU to compile for."""
    flag = os.environ.get("TRITON_INTERPRET")
    if flag is not None:
        return flag not in ("", "0")
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


def library_interpreted() -> bool:
    """Whether this process imported Triton's own library (tl.sum, ...) in
    interpreter mode: then kernels can only be interpreted here, and compiling
    one ahead of time needs another process."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def load_module(source: str, interpret: bool | None = None):
    """Import generated source as a module; cached per (source, mode)."""
    interpret = interpret_default() if interpret is None else interpret
    key = (source_hash(source), interpret)
    with _LOCK:
        module = _MODULES.get(key)
        if module is not None:
            return module
        path = cache_dir() / f"convdsl_{key[0]}.py"
        _write_atomically(path, source)
        name = f"convdsl_kernels_{key[0]}_{'interp' if interpret else 'jit'}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            sys.modules[name] = module  # Triton looks a kernel's globals up by module
            spec.loader.exec_module(module)
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
        _MODULES[key] = module
        return module


def load_kernel(source: str, name: str, interpret: bool | None = None):
    return getattr(load_module(source, interpret), name)
