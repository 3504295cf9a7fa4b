"""What every benchmark script shares: the example nets, the environment a
result was measured in, and writing results as JSON.

The scripts in this folder are run directly (`python benchmarks/run.py`), so
they import each other as top-level modules; none of this is part of the
installed package."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = Path(__file__).resolve().parent / "results"


def example_nets() -> list[tuple[Path, str]]:
    """(file, net) for every net of every example, in a fixed order."""
    from convdsl.compiler import load_program

    found = []
    for path in sorted(EXAMPLES.glob("*.cdsl")):
        for name in load_program(path).nets:
            found.append((path, name))
    return found


def compile_quiet(source, **kwargs):
    """convdsl.compile with the compiler's warnings silenced (examples are warning-free;
    generated layer cases may be reported as, say, a frozen layer)."""
    import convdsl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(source, **kwargs)


def git_commit() -> str:
    """The checkout's commit, with "+dirty" when the tree has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment() -> dict:
    """Where and with what a result was measured: every result file records it."""
    import torch
    import triton

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__,
           "commit": git_commit(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0),
                   capability=f"sm_{props.major}{props.minor}",
                   sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_driver_version())
    else:
        env.update(device="cpu", driver=None)
    return env


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def write_json(path: Path, document: dict) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
