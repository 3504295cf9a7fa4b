"""Ahead-of-time compiles of the kernels a real GPU launch would build.

`aot.compile_program` compiles each kernel at one representative
specialization its family describes, with no facts about the arguments. A
real launch knows more: Triton's JIT specializes every integer argument equal
to 1 into a constant (a unit stride makes contiguous loads vectorizable) and
marks pointers and integers divisible by 16, and the autotuner builds several
configs per kernel. This module gets those facts without a GPU:

1. run a training step of the net on host tensors inside `families.as_gpu(
   every_candidate=True)`, so every launch plans as on a GPU (GPU tiles,
   packed weights, every autotuning candidate), with `recording()` in force,
   so each `kernel[grid](...)` is recorded instead of run;
2. specialize each recorded call as Triton's JIT does (`specialization`);
3. compile the distinct ones for the target and read registers, spills,
   shared memory and what the PTX uses (wgmma, mma.sync, vector loads).

Nothing is computed: outputs are left uninitialized and kernels that read
them see whatever memory holds. Only host code runs (shapes, strides, the
families' choices), which is what decides the specialization."""
from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import loader

# What a launch's keyword arguments may hold besides the kernel's parameters.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# PTX instructions worth naming in a report, by what they say about speed.
PTX_FEATURES = {
    "wgmma": r"\bwgmma\.mma_async",  # Hopper warpgroup tensor-core MMA
    "mma_sync": r"\bmma\.sync",  # Ampere-style tensor-core MMA
    "vector_loads": r"\bld\.global(?:\.\w+)*\.v[248]\b",  # 64/128-bit global loads
    "cp_async": r"\bcp\.async\b",  # asynchronous global-to-shared copies
    "tma": r"\bcp\.async\.bulk\.tensor",  # Hopper tensor-memory-accelerator copies
}


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`."""

    name: str
    source: str
    grid: tuple
    args: tuple
    kwargs: dict
    candidate: bool  # launched by the autotuner as a non-default candidate


@dataclass
class LaunchReport:
    name: str
    config: dict  # the tile constexprs and launch options
    default: bool  # the config a launch takes without tuning
    registers: int | None
    spills: int | None
    shared_bytes: int
    features: dict = field(default_factory=dict)  # PTX_FEATURES name -> count


_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("convdsl_recording",
                                                                         default=None)


class _RecordingKernel:
    """Stands in for a compiled kernel: `kernel[grid](...)` appends a Launch."""

    def __init__(self, source: str, name: str, sink: list):
        self.source, self.name, self.sink = source, name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from .families.base import trying_candidate

            self.sink.append(Launch(self.name, self.source, tuple(grid), args, kwargs,
                                    trying_candidate()))
        return launch


def recording_kernel(source: str, name: str):
    """The recorder for `name` while recording() is in force, else None."""
    sink = _RECORDING.get()
    return None if sink is None else _RecordingKernel(source, name, sink)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within: every kernel the loader hands out records its launches here."""
    sink: list[Launch] = []
    token = _RECORDING.set(sink)
    try:
        yield sink
    finally:
        _RECORDING.reset(token)


# -- specialization, as Triton's JIT does it ---------------------------------------------------

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.float64: "*fp64", torch.int8: "*i8", torch.int16: "*i16",
                  torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8",
                  torch.bool: "*i1"}


def specialize_value(value) -> tuple[str, object]:
    """(type, attribute) of one argument as Triton's JIT specializes it: an int
    equal to 1 becomes the constant 1; pointers and ints divisible by 16 get
    the "D" (divisibility 16) attribute; ints pick i32 or i64 by range."""
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "u64" if value >= 2**63 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if value is None:
        return "constexpr", None
    raise TypeError(f"cannot specialize a {type(value).__name__} argument")


def specialization(fn, launch: Launch) -> dict:
    """A compile job (aot.compile_many's format) for `launch` of JIT function `fn`."""
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k not in LAUNCH_OPTIONS})
    signature, constexprs, attrs = {}, {}, []
    for index, param in enumerate(fn.params):
        value = bound.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, attr = specialize_value(value)
        if param.do_not_specialize and kind == "constexpr" and value == 1:
            kind, attr = "i32", ""
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = attr
        elif attr == "D":
            attrs.append([[index], [["tt.divisibility", 16]]])
    options = {k: launch.kwargs[k] for k in LAUNCH_OPTIONS if k in launch.kwargs}
    return {"source": launch.source, "name": launch.name, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": options}


def config_of(job: dict) -> dict:
    """The part of a job that tells configs apart: tile constexprs and launch options."""
    tiles = {k: v for k, v in job["constexprs"].items()
             if k.isupper() and ("BLOCK" in k or k.startswith(("ROWS_", "STEP_", "STAGES", "SPLIT")))}
    return {**tiles, **job["options"]}


# -- a whole net -------------------------------------------------------------------------------

def record_net(net, env: dict[str, int], training: bool = True,
               input_grads: bool = False) -> list[Launch]:
    """The launches of one forward (and, with `training`, backward) pass of a
    triton-backend net at sizes `env`, planned as on a GPU, every candidate;
    with `input_grads` the backward also computes the inputs' gradients."""
    from ..bench import random_inputs
    from .families.base import as_gpu

    inputs = random_inputs(net._graph, env, torch.device("cpu"))
    if training and input_grads:
        inputs = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
    trainable = training and (input_grads or any(p.requires_grad for p in net.parameters()))
    with recording() as launches, as_gpu(every_candidate=True), \
            torch.set_grad_enabled(trainable):
        out = net(*inputs)
        if trainable:
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(list(outs), [torch.zeros_like(o) for o in outs])
    return launches


def distinct_jobs(launches: list[Launch]) -> list[tuple[dict, bool]]:
    """(compile job, is a default config) per distinct specialization, in launch order."""
    jobs: dict[str, tuple[dict, bool]] = {}
    for launch in launches:
        fn = loader.load_kernel(launch.source, launch.name, interpret=False)
        job = specialization(fn, launch)
        key = repr((job["name"], sorted(job["signature"].items()),
                    sorted((k, repr(v)) for k, v in job["constexprs"].items()),
                    job["attrs"], sorted(job["options"].items())))
        default = not launch.candidate
        if key in jobs:
            default = default or jobs[key][1]
        jobs[key] = (job, default)
    return list(jobs.values())


def compile_launches(launches: list[Launch], target: str, outdir: Path | None = None,
                     progress: bool | None = None) -> list[LaunchReport]:
    """Compile each distinct recorded specialization for `target`; report each."""
    from .aot import compile_many, parse_target, resource_usage

    capability = parse_target(target)
    jobs = distinct_jobs(launches)
    results = compile_many([job for job, _ in jobs], capability, progress,
                           f"compiling {len(jobs)} launched configs for {target}")
    workdir = outdir or Path(_tmpdir())
    reports = []
    for index, ((job, default), result) in enumerate(zip(jobs, results)):
        stem = f"{job['name']}.{index}"
        if outdir is not None:
            (outdir / f"{stem}.ptx").write_text(result["ptx"])
        registers, spills = resource_usage(result["cubin"], stem, workdir)
        features = {name: len(re.findall(pattern, result["ptx"]))
                    for name, pattern in PTX_FEATURES.items()}
        reports.append(LaunchReport(job["name"], config_of(job), default, registers, spills,
                                    result["shared"], features))
    return reports


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="convdsl-aot-launch-")


def report_json(target: str, env: dict, reports: list[LaunchReport]) -> dict:
    return {"target": target, "sizes": dict(sorted(env.items())),
            "specialization": "as launched: unit ints constant, divisibility-16 facts, "
                              "every autotuning candidate",
            "kernels": [asdict(r) for r in reports]}
