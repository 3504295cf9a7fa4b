"""Launch-config autotuning: on a GPU, the first launch of a kernel at new
sizes times each candidate config (tile sizes, warps, stages) with
`triton.testing.do_bench` and keeps the fastest; on a CPU (the interpreter)
the first candidate, the family's fixed default, runs untimed.

A choice is remembered in memory and on disk, one JSON file per device and
Triton version under `$CONVDSL_CACHE_DIR/autotune/` (default
`~/.cache/convdsl/autotune/`), so a later process starts tuned. Entries are
keyed by the kernel's name and a hash of its generated source, the device,
and the concrete sizes, dtypes and layouts of its operands. Files are written
whole to a temporary file and renamed into place, so concurrent processes
never read half a file; a file that does not parse is ignored and rewritten.

`CONVDSL_AUTOTUNE=0` turns tuning off: every GPU launch takes its first config.

A family calls `choose(plan, candidates, tensors, run)` where `run(config)`
launches the kernel (and any second pass it needs) with one config: every
candidate must compute the same result, since the timing runs write the real
outputs."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

Config = TypeVar("Config")
FORMAT = 1  # the cache file's layout; a file of another format is ignored


def enabled() -> bool:
    flag = os.environ.get("CONVDSL_AUTOTUNE", "1").strip().lower()
    return flag not in ("0", "false", "off", "no")


def cache_dir() -> Path:
    root = os.environ.get("CONVDSL_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "convdsl") / "autotune"


def do_bench_median(fn: Callable[[], Any]) -> float:
    """Milliseconds, the median of repeated runs after a warm-up. Short budgets:
    tuning happens inside a user's first call."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _log(message: Callable[[], str]) -> None:
    """CONVDSL_LOG=autotune: each trial and each choice, on stderr."""
    try:
        from .. import log
    except ImportError:  # a build without convdsl.log: nothing to print to
        return
    log.emit("autotune", message)


def layout(t: torch.Tensor) -> str:
    """A tensor's strides as a class: what a kernel's speed depends on, not the numbers."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return "channels_last_3d"
    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))
    return "strided:" + "".join(map(str, order)) + (":unit" if t.stride(order[-1]) == 1 else "")


def describe(value) -> Any:
    """A config (dict, tuple, dataclass such as a Tile, number) as JSON data,
    to store it and to recognise it among the candidates later."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                **{f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """What a tuned choice holds for."""

    kernel: str  # the kernel's name and a hash of its source
    device: str  # e.g. "NVIDIA H100 80GB HBM3"
    sizes: Any  # JSON data: per operand [shape, dtype, layout], then family extras

    def text(self) -> str:
        return json.dumps([self.kernel, self.sizes], separators=(",", ":"))


def operand_sizes(tensors: Sequence[torch.Tensor], extra=()) -> list:
    return [[[list(t.shape), str(t.dtype).replace("torch.", ""), layout(t)] for t in tensors],
            describe(extra)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def _triton_version() -> str:
    import triton

    return triton.__version__


class Autotuner:
    """Times candidates, remembers the winner per key in memory and on disk."""

    def __init__(self, directory: Path | None = None,
                 timer: Callable[[Callable[[], Any]], float] | None = None):
        self.directory = directory  # None: cache_dir() at each use (the env may change)
        self.timer = timer or do_bench_median
        self._chosen: dict[tuple[str, str], int] = {}  # (device, key text) -> candidate index
        # choose()'s fast path: (id(plan), device, operands) -> (plan, candidate index);
        # holding the plan keeps its id unique.
        self.fast: dict[tuple, tuple] = {}
        self._lock = threading.RLock()

    # -- the cache file --------------------------------------------------------------------
    def path(self, device: str) -> Path:
        directory = self.directory if self.directory is not None else cache_dir()
        return directory / f"{_slug(device)}-triton-{_slug(_triton_version())}.json"

    def load(self, device: str) -> dict:
        """The stored entries for `device`; {} when the file is missing, does not
        parse, or belongs to another format, device or Triton version."""
        try:
            doc = json.loads(self.path(device).read_text())
        except (OSError, ValueError):
            return {}
        if (not isinstance(doc, dict) or doc.get("format") != FORMAT
                or doc.get("device") != device or doc.get("triton") != _triton_version()
                or not isinstance(doc.get("entries"), dict)):
            return {}
        return doc["entries"]

    def _store(self, device: str, key_text: str, entry: dict) -> None:
        """Add one entry, merged with what other processes stored meanwhile."""
        path = self.path(device)
        entries = dict(self.load(device))
        entries[key_text] = entry
        doc = {"format": FORMAT, "device": device, "triton": _triton_version(),
               "entries": entries}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError:
            pass  # a read-only cache costs a re-tune in the next process, nothing else

    # -- choosing --------------------------------------------------------------------------
    def choose(self, key: TuneKey, candidates: Sequence[Config],
               run: Callable[[Config], Any]) -> Config:
        """The fastest candidate for `key`: remembered, stored, or timed now."""
        if len(candidates) == 1:
            return candidates[0]
        memo = (key.device, key.text())
        with self._lock:
            index = self._chosen.get(memo)
            if index is None or index >= len(candidates):
                index = _find(self.load(key.device).get(memo[1]), candidates)
                how = "from the cache file"
                if index is None:
                    index, how = self._tune(key, candidates, run), "tuned"
                self._chosen[memo] = index
                _log(lambda: f"{key.kernel} at {json.dumps(key.sizes)}: "
                             f"{describe(candidates[index])} ({how})")
        return candidates[index]

    def _tune(self, key: TuneKey, candidates: Sequence[Config], run) -> int:
        timings = []
        for config in candidates:
            try:
                timings.append(float(self.timer(lambda config=config: run(config))))
            except Exception as err:  # noqa: BLE001  (out of resources, say: not a candidate)
                timings.append(math.inf)
                _log(lambda config=config, err=err: f"{key.kernel}: {describe(config)} "
                                                    f"failed: {type(err).__name__}: {err}")
                continue
            _log(lambda config=config, ms=timings[-1]: f"{key.kernel}: {describe(config)} "
                                                       f"{ms:.4f} ms")
        if all(math.isinf(t) for t in timings):
            return 0  # the launch that follows reports the failure
        index = min(range(len(timings)), key=timings.__getitem__)
        self._store(key.device, key.text(), {
            "config": describe(candidates[index]), "index": index,
            "timings_ms": [None if math.isinf(t) else round(t, 6) for t in timings],
            "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        return index

    def forget(self) -> None:
        """Drop the in-memory choices (the files stay)."""
        with self._lock:
            self._chosen.clear()
            self.fast.clear()


def _find(entry, candidates: Sequence) -> int | None:
    """The stored choice's index among today's candidates, recognised by value
    (so a reordered list still matches, and a changed one is re-tuned)."""
    if not isinstance(entry, dict) or "config" not in entry:
        return None
    wanted = entry["config"]
    described = [describe(c) for c in candidates]
    index = entry.get("index")
    if isinstance(index, int) and 0 <= index < len(candidates) and described[index] == wanted:
        return index
    return next((i for i, d in enumerate(described) if d == wanted), None)


TUNER = Autotuner()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def choose(plan, candidates: Sequence[Config] | dict, tensors: Sequence[torch.Tensor],
           run: Callable[[Config], Any], extra=()) -> Config:
    """The launch config for `plan` on `tensors`: the first candidate on a CPU
    or with CONVDSL_AUTOTUNE=0, else the fastest, tuned on first use.
    `candidates` is a list, or a family's {"gpu": [...], "cpu": [...]} table
    (the tensors' device picks the list); `extra` holds anything else the best
    config depends on (a mode, a window)."""
    from .families.base import candidate_run, runs_every_candidate, target

    device = tensors[0].device
    if isinstance(candidates, dict):  # a family's {"gpu": [...], "cpu": [...]} table
        candidates = candidates[target(tensors[0])]
    if device.type != "cuda":
        # No GPU to time on. Inside families.as_gpu(every_candidate=True) every
        # other candidate runs once (checked under the interpreter, or recorded
        # for ahead-of-time compiles); the caller launches the default.
        if runs_every_candidate():
            for config in candidates[1:]:
                with candidate_run():
                    run(config)
        return candidates[0]
    if len(candidates) == 1 or not enabled():
        return candidates[0]
    # Every launch asks: a plain-tuple lookup first, so a tuned kernel's launch
    # costs microseconds here, not a JSON key and a hash of its source. For one
    # plan object, `extra` follows from the operands' sizes, so they key it.
    fast = (id(plan), device.index, len(candidates),
            *((t.shape, t.stride(), t.dtype) for t in tensors))
    tuner = TUNER
    entry = tuner.fast.get(fast)
    if entry is not None and entry[0] is plan:
        return candidates[entry[1]]
    key = TuneKey(f"{plan.name}-{_hash_of(plan.source)}", device_name(device),
                  operand_sizes(tensors, extra))
    chosen = tuner.choose(key, candidates, run)
    if len(tuner.fast) > 65536:
        tuner.fast.clear()
    tuner.fast[fast] = (plan, next(i for i, c in enumerate(candidates) if c is chosen))
    return chosen
_HASHES: dict[int, tuple[str, str]] = {}  # id(source) -> (source, its hash)


def _hash_of(source: str) -> str:
    """loader.source_hash, remembered per source string (the same object every launch)."""
    found = _HASHES.get(id(source))
    if found is None or found[0] is not source:
        from .loader import source_hash

        if len(_HASHES) > 4096:
            _HASHES.clear()
        found = _HASHES[id(source)] = (source, source_hash(source))
    return found[1]
