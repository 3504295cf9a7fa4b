"""What the explorer shows, gathered from the compiler: the IR after every
pass (forward and backward), the kernel plans of every program, their cost
and, on request, their ahead-of-time report. Nothing here writes HTML."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from ..errors import ConvDSLError
from ..ir.printer import to_text

DEFAULT_SIZE = 32  # a size symbol nobody set (as in `convdsl compile --shape`)


@dataclass
class Stage:
    """The IR of one net at one point of the pipeline."""

    index: int
    name: str  # "parsed", a pass name, or "backward: <pass>"
    doc: str
    direction: str  # "forward" or "backward"
    graph: object  # convdsl.ir.Graph, a snapshot no later pass touches
    text: str
    changed: bool  # whether the printout differs from the stage before


@dataclass
class KernelView:
    """One kernel plan of one program, with its cost and compile report."""

    program: str  # "inference", "training" or "backward"
    name: str
    family: str
    direction: str
    nodes: tuple[int, ...]
    source: str
    source_id: str  # the same generated text shares one listing on the page
    flops: int | None = None
    bytes: int | None = None
    cost_error: str | None = None
    aot: dict | None = None  # registers, spills, shared_bytes (with --target)


@dataclass
class Exploration:
    filename: str
    source: str
    net: str
    sizes: dict[str, int]
    stages: list[Stage]
    kernels: list[KernelView]
    target: str | None = None
    nets: list[str] = field(default_factory=list)  # every net of the file


def node_key(direction: str, node_id: int) -> str:
    """The page-wide name of an IR node: the same node in every stage, and in kernels."""
    return f"{direction[0]}{node_id}"


def op_label(node) -> str:
    """An op's name as the printer shows it: `conv`, `conv_dx`, `fused[conv+relu]`."""
    name = node.op.lstrip("_")
    pattern = node.attrs.get("pattern")
    return f"{name}[{pattern}]" if isinstance(pattern, str) else name


def node_lines(node) -> list[int]:
    """The source lines a node was written on (a call may span several)."""
    span = node.span
    last = max(span.end_line or span.line, span.line)
    return list(range(span.line, last + 1))


def explore_net(source, *, net: str | None = None, sizes: dict[str, int] | None = None,
                target: str | None = None, progress: bool | None = None) -> Exploration:
    """Compile `source` (a path or .cdsl text) for the triton backend and gather every
    stage. `sizes` gives size symbols their values for the cost model (unset: 32);
    `target` (e.g. "sm_90") adds the ahead-of-time compile report (slow)."""
    from ..compiler import compile, load_program
    from ..parser import read_source
    from ..triton.aot import parse_target

    if target is not None:
        try:
            parse_target(target)  # before the work, not after it
        except ValueError as err:
            raise ConvDSLError(str(err)) from None
    text, filename = read_source(source)
    compiled = compile(source, net=net, backend="triton")
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(compiled._graph.symbols))
    if unknown:
        have = ", ".join(compiled._graph.symbols) or "none"
        raise ConvDSLError(f"sizes name {', '.join(unknown)}, which no input of net "
                           f"{compiled.name} uses (it has: {have})")
    env = {s: sizes.get(s, DEFAULT_SIZE) for s in compiled._graph.symbols}
    stages = forward_stages(compiled)
    stages += backward_stages(compiled, first_index=len(stages))
    kernels = kernel_views(compiled, env)
    if target is not None:
        add_aot_reports(compiled, kernels, target, env, progress)
    return Exploration(filename=filename, source=text, net=compiled.name, sizes=env,
                       stages=stages, kernels=kernels, target=target,
                       nets=list(load_program(text).nets))


def _snapshots(first, passes_run, direction: str, first_index: int, first_name: str,
               first_doc: str, prefix: str = "") -> list[Stage]:
    """Stages for a graph and then for each pass `passes_run(after)` runs on it."""
    stages: list[Stage] = []

    def take(name: str, doc: str, graph) -> None:
        text = to_text(graph)
        changed = not stages or stages[-1].text != text
        stages.append(Stage(first_index + len(stages), name, doc, direction, graph.copy(),
                            text, changed))

    take(first_name, first_doc, first)
    passes_run(lambda p, graph: take(prefix + p.name, p.doc, graph))
    return stages


def forward_stages(compiled) -> list[Stage]:
    """The parsed graph, then the graph after each pass of the pipeline."""
    from ..passes import run_pipeline

    parsed = compiled._graphs["parsed"]
    return _snapshots(parsed, lambda after: run_pipeline(parsed, after=after), "forward", 0,
                      "parsed", "the program as written: blocks inlined, shapes inferred")


def backward_stages(compiled, first_index: int) -> list[Stage]:
    """The derived backward graph, then the graph after each backward pass (if the
    compiler has any), for the trainable parameters' gradients."""
    from .. import passes
    from ..autodiff import derive_backward

    derived = derive_backward(compiled._graph, ()).graph
    run_backward = getattr(passes, "run_backward_pipeline", None)

    def run(after):
        if run_backward is not None:
            run_backward(derived.copy(), after=after)

    return _snapshots(derived, run, "backward", first_index, "backward",
                      "derived from the optimized graph by each op's VJP rule",
                      prefix="backward: ")


def _program_label(runner, program) -> str:
    if program is runner.inference:
        return "inference"
    if program is getattr(runner, "_training", None):
        return "training"
    return "backward"


def kernel_views(compiled, env: dict[str, int]) -> list[KernelView]:
    """Every kernel plan of every program a training step can run, with its analytic
    cost at sizes `env`."""
    from ..ir.types import symbol
    from ..triton.families import family

    runner = compiled._program
    sym_env = {symbol(k): v for k, v in env.items()}
    views = []
    for program in runner.programs(compiled):
        label = _program_label(runner, program)
        for plan in program.plans:
            digest = hashlib.sha1(plan.source.encode()).hexdigest()[:12]
            view = KernelView(label, plan.name, plan.family, plan.direction, tuple(plan.nodes),
                              plan.source, f"src-{digest}")
            if plan.source:
                # One family's cost bug must not hide the rest of the page: the cell says it.
                try:
                    flops, nbytes = family(plan.family).cost(plan, program.graph, sym_env)
                    view.flops, view.bytes = int(flops), int(nbytes)
                except Exception as err:  # noqa: BLE001
                    view.cost_error = f"{type(err).__name__}: {err}"
            views.append(view)
    return views


def add_aot_reports(compiled, kernels: list[KernelView], target: str, env: dict[str, int],
                    progress: bool | None) -> None:
    """Compile every kernel for `target` (no GPU needed) and attach its resources."""
    from ..triton.aot import compile_program

    reports = {r.name: r for r in compile_program(compiled._program, target, None, env,
                                                  progress)}
    for view in kernels:
        report = reports.get(view.name)
        if report is not None:
            view.aot = {"registers": report.registers, "spills": report.spills,
                        "shared_bytes": report.shared_bytes}


_NODE_LINE = re.compile(r"^\s+%(\d+)\b")


def text_node_id(line: str) -> int | None:
    """The node a line of the IR printout describes (`  %3 = conv(...)`), if any."""
    match = _NODE_LINE.match(line)
    return int(match.group(1)) if match else None


def is_continuation(line: str) -> bool:
    """A line the printer puts under a node for more of the same node (`    | s0 = ...`)."""
    return line.lstrip().startswith("|")
