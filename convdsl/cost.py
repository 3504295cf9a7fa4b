"""The cost model: FLOPs, global-memory bytes and kernel launches of a net's
kernels, from the IR and the kernel plans, at concrete sizes — and what the
optimizer saves (`convdsl ir --cost`, the compile report, docs/fusion.md).

Each kernel family states its analytic cost (`Family.cost`): the FLOPs it
executes (recomputation included) and the bytes it must move to and from
global memory (every operand read once, every result written once). Views
cost nothing. The figures are a model, not a measurement: caches, partial
tiles and atomics are not in them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .ir.types import symbol

DEFAULT_SIZE = 32  # for size symbols the caller does not set (N too)


@dataclass(frozen=True)
class KernelCost:
    name: str
    family: str
    program: str  # inference | training | backward
    flops: int
    bytes: int


@dataclass(frozen=True)
class ProgramCost:
    program: str
    kernels: int
    flops: int
    bytes: int


def size_env(graph, sizes: dict[str, int] | None = None) -> dict:
    """Concrete values for the graph's size symbols (unset ones: DEFAULT_SIZE)."""
    sizes = sizes or {}
    return {symbol(s): int(sizes.get(s, DEFAULT_SIZE)) for s in graph.symbols}


def kernel_costs(net, sizes: dict[str, int] | None = None) -> list[KernelCost]:
    """Every kernel a training step can run (inference, training forward,
    backward), with its cost. `net` must use the triton backend (lowering only:
    nothing is compiled or run)."""
    from .triton.families import family
    from .triton.runtime import TritonNet

    runner = net._program if net._program is not None else TritonNet(net)
    runner.programs(net)
    env = size_env(net._graph, sizes)
    found = []
    programs = [("inference", runner.inference)]
    if runner._training is not None:
        programs.append(("training", runner._training))
    programs += [("backward", p) for p in runner._backward.values()]
    for label, program in programs:
        for plan in program.plans:
            if not plan.source:
                continue  # a view: no kernel, no traffic
            flops, nbytes = family(plan.family).cost(plan, program.graph, env)
            found.append(KernelCost(plan.name, plan.family, label, int(flops), int(nbytes)))
    return found


def program_costs(costs: list[KernelCost]) -> dict[str, ProgramCost]:
    """Totals per program; `step` is one training step (training forward + backward)."""
    totals = {}
    for label in ("inference", "training", "backward"):
        chosen = [c for c in costs if c.program == label]
        totals[label] = ProgramCost(label, len(chosen), sum(c.flops for c in chosen),
                                    sum(c.bytes for c in chosen))
    step = [c for c in costs if c.program in ("training", "backward")]
    totals["step"] = ProgramCost("step", len(step), sum(c.flops for c in step),
                                 sum(c.bytes for c in step))
    return totals


def compare(source, net_name: str | None, sizes: dict[str, int] | None = None) -> dict:
    """Costs of a net compiled without and with the optimizer."""
    from .compiler import compile

    found = {}
    for label, optimize in (("unoptimized", False), ("optimized", True)):
        net = compile(source, net=net_name, backend="triton", optimize=optimize)
        costs = kernel_costs(net, sizes)
        found[label] = {"kernels": costs, "totals": program_costs(costs)}
    return found


def saving(before: int, after: int) -> str:
    if before == 0:
        return "-"
    return f"{100.0 * (before - after) / before:.0f}%"


def format_comparison(result: dict, verbose: bool = True) -> str:
    """The `convdsl ir --cost` report: kernels before and after, then totals."""
    lines = []
    if verbose:
        for label in ("unoptimized", "optimized"):
            lines.append(f"{label} kernels:")
            lines.append(f"  {'program':10} {'kernel':44} {'family':12} {'MFLOP':>10} {'MB':>9}")
            for c in result[label]["kernels"]:
                lines.append(f"  {c.program:10} {c.name[:44]:44} {c.family:12} "
                             f"{c.flops / 1e6:>10.3f} {c.bytes / 1e6:>9.3f}")
            lines.append("")
    lines.append(f"{'program':10} {'kernels':>15} {'MFLOP':>23} {'MB':>25}  bytes saved")
    before, after = result["unoptimized"]["totals"], result["optimized"]["totals"]
    for label in ("inference", "step"):
        b, a = before[label], after[label]
        lines.append(f"{label:10} {b.kernels:>6} -> {a.kernels:<6}  {b.flops / 1e6:>10.3f} -> "
                     f"{a.flops / 1e6:<10.3f} {b.bytes / 1e6:>10.3f} -> {a.bytes / 1e6:<10.3f}  "
                     f"{saving(b.bytes, a.bytes)}")
    return "\n".join(lines) + "\n"
