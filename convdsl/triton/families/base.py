"""What every kernel family provides. A family turns one IR node (or a fused
group of nodes) into a KernelPlan, launches the compiled kernel on real
tensors, and describes a representative specialization for ahead-of-time
compilation and the cost model."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ...ir import Graph, Node, ValueRef

# IR dtype → Triton pointer type, for ahead-of-time signatures.
POINTER = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
INT32_LIMIT = 2**31 - 1


@dataclass
class KernelPlan:
    """One generated kernel and everything needed to run and report it."""

    name: str  # a safe identifier (codegen.safe_name), unique within the net
    family: str
    source: str  # the whole generated module
    nodes: tuple[int, ...]  # the IR nodes it computes, in order
    inputs: tuple[ValueRef, ...]  # tensor operands from outside the group, in kernel order
    outputs: tuple[ValueRef, ...]  # the values it produces
    meta: dict[str, Any] = field(default_factory=dict)  # family-specific compile-time facts
    direction: str = "forward"


class Family:
    name: str = ""

    def plan(self, graph: Graph, nodes: list[Node]) -> KernelPlan:
        raise AssertionError(f"family {self.name} must define plan()")

    def launch(self, plan: KernelPlan, kernel, inputs: list[torch.Tensor],
               params: dict[int, dict[str, torch.Tensor]], attrs: dict[int, dict]) -> list:
        """Run the kernel: `params` and `attrs` are keyed by IR node id."""
        raise AssertionError(f"family {self.name} must define launch()")

    def aot(self, plan: KernelPlan, graph: Graph) -> tuple:
        """(signature, constexprs) of a representative specialization for
        triton.compile, optionally with a third item: launch options
        ({"num_warps": ..., "num_stages": ...}) of the GPU config."""
        raise AssertionError(f"family {self.name} must define aot()")

    # A family whose module holds helper kernels (a split-K sum) also defines
    # aot_extra(plan, graph) -> [(name, signature, constexprs[, options])].

    def cost(self, plan: KernelPlan, graph: Graph, env: dict) -> tuple[int, int]:
        """Analytic (FLOPs, global-memory bytes) at concrete sizes `env`."""
        raise AssertionError(f"family {self.name} must define cost()")


# Set by as_gpu(): launches on host tensors take the GPU's configs.
_AS_GPU: contextvars.ContextVar[dict | None] = contextvars.ContextVar("convdsl_as_gpu",
                                                                      default=None)


def target(t: torch.Tensor) -> str:
    """Which configs a launch takes (tile tables, launch options, how tl.dot
    multiplies): the interpreter's ("cpu") or a GPU's ("gpu"). The one place
    every family asks."""
    if _AS_GPU.get() is not None:
        return "gpu"
    return "cpu" if t.device.type == "cpu" else "gpu"


@contextlib.contextmanager
def as_gpu(every_candidate: bool = False) -> Iterator[None]:
    """Launches on host tensors plan as on a GPU: GPU tiles, launch options
    and tl.dot precision, with no GPU. Under the interpreter this checks that
    the GPU configs compute the right answer; with recording kernels
    (aot_launch.py) it captures the exact arguments a GPU launch would pass.
    With `every_candidate`, a family's autotuned launch also runs each of its
    other candidates (autotune.choose) before the default."""
    token = _AS_GPU.set({"every_candidate": every_candidate})
    try:
        yield
    finally:
        _AS_GPU.reset(token)


def runs_every_candidate() -> bool:
    """Inside as_gpu(every_candidate=True)."""
    mode = _AS_GPU.get()
    return bool(mode and mode["every_candidate"])


@contextlib.contextmanager
def candidate_run() -> Iterator[None]:
    """Marks the launches of a non-default autotuning candidate (for recorders)."""
    mode = _AS_GPU.get()
    token = _AS_GPU.set({**(mode or {"every_candidate": False}), "candidate": True})
    try:
        yield
    finally:
        _AS_GPU.reset(token)


def trying_candidate() -> bool:
    mode = _AS_GPU.get()
    return bool(mode and mode.get("candidate"))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch's grid. triton.cdiv and triton.next_power_of_2
    are constexpr functions in recent Triton, microseconds a call through their
    wrapper; a launch calls these several times."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Index arithmetic in int64 once any tensor holds 2^31 elements or more."""
    return any(t.numel() > INT32_LIMIT for t in tensors)


def float_literal(value: float) -> str:
    """A float as Triton source text; the builder admits only finite numbers."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"non-finite constant {value} cannot be compiled")
    return repr(value)
