"""Kernel source → a Triton kernel object, through a persistent file cache.

Triton reads a kernel's source with `inspect`, so each generated module is a
file: an entry of the cache directory (`CONVDSL_CACHE_DIR`, default
`~/.cache/convdsl/kernels`), named by a key over the source, the Triton
version and the device kind. The cache is shared by every process of a user:

- entries are written atomically (a temporary file, then `os.replace`), so a
  reader sees a whole file or none, whichever process wrote it;
- an entry is verified against the source's hash before use and rewritten when
  it differs (truncated, corrupted, tampered with): the module is executed
  from the verified text held in memory, never from what the file says;
- loading an entry refreshes its time; once the entries pass
  `CONVDSL_CACHE_MAX_MB` (default 512) the least recently used go;
- an unwritable cache directory falls back to a private temporary one.

Without a GPU the module is imported with TRITON_INTERPRET=1, which makes
`@triton.jit` build an interpreted kernel that runs on CPU tensors.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import linecache
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import log

_LOCK = threading.Lock()
_MODULES: dict[tuple[str, bool], object] = {}
FORMAT = 2  # the entry layout; a change makes new keys, so old entries age out
ENTRY_PREFIX = "convdsl_"
DEFAULT_MAX_MB = 512
_STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a writer that died


def cache_dir() -> Path:
    root = os.environ.get("CONVDSL_CACHE_DIR")
    path = Path(root) if root else Path.home() / ".cache" / "convdsl" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _writable_cache_dir() -> Path:
    """The cache directory, or a private temporary one where it cannot be used."""
    try:
        path = cache_dir()
        if os.access(path, os.W_OK | os.X_OK):
            return path
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"convdsl-kernels-{os.getpid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def max_cache_bytes() -> int:
    text = os.environ.get("CONVDSL_CACHE_MAX_MB", "").strip()
    try:
        megabytes = float(text) if text else DEFAULT_MAX_MB
    except ValueError:
        megabytes = DEFAULT_MAX_MB
    return int(max(megabytes, 0.0) * 2**20)


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=2)
def device_kind(interpret: bool) -> str:
    """What the entry is for: the interpreter, or a GPU architecture."""
    if interpret:
        return "interpreter"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            backend = "hip" if getattr(torch.version, "hip", None) else "cuda"
            return f"{backend}-{major}{minor}"
    except ImportError:
        pass
    return "compiled"  # ahead-of-time compilation on a machine without a GPU


@functools.lru_cache(maxsize=1)
def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except ImportError:
        return "none"


def entry_key(source: str, interpret: bool) -> str:
    """The cache key: the source, the Triton version and the device kind."""
    text = "\0".join((str(FORMAT), _triton_version(), device_kind(interpret), source))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def entry_path(source: str, interpret: bool, directory: Path | None = None) -> Path:
    directory = _writable_cache_dir() if directory is None else directory
    return directory / f"{ENTRY_PREFIX}{entry_key(source, interpret)}.py"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _verified_entry(path: Path, source: str) -> str:
    """Make `path` hold exactly `source`: "hit" when it did, else "new" or
    "rebuilt" (it held something else: truncated, corrupted, tampered with)."""
    expected = _digest(source.encode())
    try:
        if _digest(path.read_bytes()) == expected:
            os.utime(path)  # recently used: last to be evicted
            return "hit"
        state = "rebuilt"
    except FileNotFoundError:
        state = "new"
    _write_atomically(path, source)
    return state


def evict(directory: Path | None = None, max_bytes: int | None = None,
          keep: Path | None = None) -> list[Path]:
    """Delete the least recently used entries until the rest fit in `max_bytes`,
    never `keep` (the entry just written). Only this loader's files are
    touched: other tools may share the directory."""
    return _evict(directory, max_bytes, keep)[0]


def _evict(directory: Path | None, max_bytes: int | None,
           keep: Path | None) -> tuple[list[Path], int]:
    """evict(), also giving the bytes the remaining entries hold."""
    directory = _writable_cache_dir() if directory is None else directory
    max_bytes = max_cache_bytes() if max_bytes is None else max_bytes
    entries, now = [], time.time()
    for path in directory.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:  # another process evicted it first
            continue
        if path.name.startswith(ENTRY_PREFIX) and path.suffix == ".py":
            entries.append((stat.st_mtime, stat.st_size, path))
        elif path.name.startswith(".tmp-") and now - stat.st_mtime > _STALE_TEMP_SECONDS:
            path.unlink(missing_ok=True)
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)  # a reader holds the text in memory already
        log.emit("cache", f"evicted {path}")
        total -= size
        removed.append(path)
    return removed, total


# What this process knows of the directory's size, so that writing n entries
# does not scan it n times: a scan on the first write, when the estimate passes
# the bound, and every RESCAN_EVERY writes (other processes write too).
RESCAN_EVERY = 64
_usage: dict = {"directory": None, "bytes": 0, "writes": 0}


def _account(directory: Path, path: Path) -> None:
    limit = max_cache_bytes()
    try:
        _usage["bytes"] += path.stat().st_size
    except FileNotFoundError:
        pass
    _usage["writes"] += 1
    if (_usage["directory"] != directory or _usage["bytes"] > limit
            or _usage["writes"] % RESCAN_EVERY == 0):
        _usage["directory"] = directory
        _usage["bytes"] = _evict(directory, limit, path)[1]


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


def _execute(name: str, path: Path, source: str):
    """A module from the verified text; Triton's `inspect` reads the same text
    through linecache (an entry without a time is never re-read from disk)."""
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(path)
    linecache.cache[str(path)] = (len(source), None, source.splitlines(True), str(path))
    sys.modules[name] = module  # Triton looks a kernel's globals up by module
    try:
        # The compiler's own generated code (user text reaches it only as mangled names).
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_module(source: str, interpret: bool | None = None):
    """Import generated source as a module; cached per (source, mode)."""
    interpret = interpret_default() if interpret is None else interpret
    key = (entry_key(source, interpret), interpret)
    with _LOCK:
        module = _MODULES.get(key)
        if module is not None:
            return module
        directory = _writable_cache_dir()
        path = entry_path(source, interpret, directory)
        state = _verified_entry(path, source)
        log.emit("cache", f"{state} {path}")
        if state != "hit":
            _account(directory, path)
        name = f"convdsl_kernels_{key[0]}_{'interp' if interpret else 'jit'}"
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            module = _execute(name, path, source)
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
        _MODULES[key] = module
        return module


def load_kernel(source: str, name: str, interpret: bool | None = None):
    """Kernel `name` of a generated module; while aot_launch.recording() is in
    force (and no mode is asked for), a recorder of its launches instead."""
    if interpret is None:
        from .aot_launch import recording_kernel

        recorder = recording_kernel(source, name)
        if recorder is not None:
            return recorder
    return getattr(load_module(source, interpret), name)
