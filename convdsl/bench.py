"""`convdsl bench`: how fast a net's generated kernels are next to what a
user would otherwise run, on the same random input and parameters:

    triton    the generated kernels (backend="triton")
    eager     the torch backend: each op one PyTorch call (cuDNN convolutions on a GPU)
    compile   torch.compile of the torch-backend net (Inductor)

Forward only (under no_grad), or with --backward a forward and a backward
pass (the gradients of the parameters and of the input). On a GPU each is
timed with triton.testing.do_bench (median after a warm-up) and reported as a
ratio; on a CPU the kernels run under Triton's interpreter, so the numbers
say nothing about a GPU and the command says so. The timers here also serve
the benchmark suite in benchmarks/."""
from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ConvDSLError

DTYPES = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "f16": torch.float16}
MODES = ("triton", "eager", "compile")
CPU_WARNING = ("note: no GPU here: the generated kernels run under Triton's interpreter, so "
               "these timings mean nothing for a GPU (run `convdsl bench` on one).")


# -- timing ----------------------------------------------------------------------------------

def time_gpu(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
             warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn on the GPU (CUDA events, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                         grad_to_none=list(grad_to_none) or None,
                                         return_mode="median"))


def time_cpu(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
             repeat: int = 3) -> float:
    """Median wall-clock milliseconds of fn after one warm-up run."""
    fn()
    times = []
    for _ in range(max(repeat, 1)):
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_call(fn: Callable[[], object], device: torch.device,
              grad_to_none: Sequence[torch.Tensor] = (), repeat: int = 3) -> float:
    if device.type == "cuda":
        return time_gpu(fn, grad_to_none)
    return time_cpu(fn, grad_to_none, repeat)


def geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def precision(dtype_name: str) -> None:
    """fp32 convolutions and matmuls in TF32 for "tf32", exact for "f32" (PyTorch and
    the generated kernels read the same flags)."""
    tf32 = dtype_name == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


# -- nets and inputs -------------------------------------------------------------------------

def with_input_dtype(text: str, filename: str, net: str | None, dtype: str) -> str:
    """The source with the chosen net's f32 inputs declared as `dtype`
    (bf16/f16: the same net on 16-bit activations)."""
    from .builder import pick_net
    from .parser import parse

    if dtype in ("f32", "tf32"):
        return text
    net_ast = pick_net(parse(text, filename), net)
    lines = text.splitlines(keepends=True)
    # last first, so an edit never shifts the columns of one still to come
    for inp in sorted(net_ast.inputs, key=lambda i: (i.dtype_span.line, i.dtype_span.column),
                      reverse=True):
        if inp.dtype != "f32":
            continue
        span = inp.dtype_span
        row = lines[span.line - 1]
        lines[span.line - 1] = row[:span.column - 1] + dtype + row[span.end_column - 1:]
    return "".join(lines)


def concrete_shape(graph, node_id: int, sizes: dict[str, int]) -> list[int]:
    """An input's shape with its size symbols bound; a missing symbol is a usage error."""
    from .cli import UsageError

    declared = graph.node(node_id).types[0]
    shape = []
    for d in declared.shape:
        if d.is_Integer:
            shape.append(int(d))
        elif str(d) in sizes:
            shape.append(sizes[str(d)])
        else:
            raise UsageError(f"input '{graph.node(node_id).attrs['name']}' needs size {d}: "
                             f"pass --shape {d}=...")
    return shape


def random_inputs(graph, sizes: dict[str, int], device, seed: int = 0) -> list[torch.Tensor]:
    """One random tensor per input at `sizes`; naming a size no input uses is an error."""
    from .checks import TORCH_DTYPES
    from .cli import UsageError

    unknown = set(sizes) - set(graph.symbols)
    if unknown:
        raise UsageError(f"--shape names {', '.join(sorted(unknown))}, which no input of net "
                         f"{graph.name} uses (it has: {', '.join(graph.symbols) or 'none'})")

    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(concrete_shape(graph, n, sizes), generator=generator)
            .to(device=device, dtype=TORCH_DTYPES[graph.node(n).types[0].dtype])
            for n in graph.inputs]


def skip_feature_fitting(net) -> None:
    """Timing does not depend on what an init=kmeans layer learned: run it unfitted."""
    net._kmeans_pending = set()


# -- one net, three ways -----------------------------------------------------------------------

@dataclass
class Result:
    mode: str
    ms: float | None = None
    error: str | None = None
    note: str | None = None


@dataclass
class NetBench:
    net: str
    device: str
    dtype: str
    backward: bool
    sizes: dict
    results: list[Result] = field(default_factory=list)

    def ms(self, mode: str) -> float | None:
        return next((r.ms for r in self.results if r.mode == mode), None)

    def ratio(self, baseline: str) -> float | None:
        """How many times faster the generated kernels are than `baseline`."""
        mine, theirs = self.ms("triton"), self.ms(baseline)
        return theirs / mine if mine and theirs else None


def step_function(module, inputs: list[torch.Tensor], backward: bool) -> tuple[Callable, list]:
    """(a function running one forward (and backward) pass, the tensors whose
    gradients it sets, to clear between runs)."""
    if not backward:
        def forward():
            with torch.no_grad():
                return module(*inputs)
        return forward, []
    leaves = [x for x in inputs if x.is_floating_point()]
    for x in leaves:
        x.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    outs = module(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    generator = torch.Generator().manual_seed(1)
    seeds = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in outs]

    def step():
        found = module(*inputs)
        found = found if isinstance(found, tuple) else (found,)
        torch.autograd.backward(found, seeds)

    return step, leaves + params


def bench_source(text: str, filename: str, net: str | None, sizes: dict[str, int],
                 dtype: str = "f32", backward: bool = False, modes: Sequence[str] = MODES,
                 device: torch.device | None = None, repeat: int = 3,
                 compile_mode: str | None = None) -> NetBench:
    """Time one net every way in `modes` on the same inputs and parameters."""
    from .compiler import compile as compile_net

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision(dtype)
    text = with_input_dtype(text, filename, net, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = compile_net(text, net=net, backend="torch")
    skip_feature_fitting(reference)
    reference.to(device)
    inputs = random_inputs(reference._graph, sizes, device)
    found = NetBench(reference.name, _device_name(device), dtype, backward, dict(sizes))
    for mode in modes:
        try:
            if mode == "eager":
                module = reference
            elif mode == "compile":
                module = torch.compile(reference, mode=compile_mode)
            elif mode == "triton":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = compile_net(text, net=net, backend="triton")
                skip_feature_fitting(module)
                module.to(device)
                module.load_state_dict(reference.state_dict())
            else:
                raise ValueError(f"unknown mode {mode}")
            step, grads = step_function(module, [x.detach().clone() for x in inputs], backward)
            found.results.append(Result(mode, time_call(step, device, grads, repeat)))
        except ConvDSLError:
            raise
        except Exception as err:  # noqa: BLE001  (a baseline that fails is reported, not fatal)
            found.results.append(Result(mode, error=f"{type(err).__name__}: {err}"[:300]))
    return found


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def format_bench(found: NetBench) -> str:
    what = "forward + backward" if found.backward else "forward"
    sizes = ",".join(f"{k}={v}" for k, v in found.sizes.items())
    lines = [f"net {found.net}: {what}, {found.dtype}, {sizes} on {found.device}",
             f"  {'mode':10} {'median ms':>11} {'triton is':>12}"]
    for r in found.results:
        if r.error:
            lines.append(f"  {r.mode:10} {'failed':>11}   {r.error}")
            continue
        ratio = "" if r.mode == "triton" else _times(found.ratio(r.mode))
        lines.append(f"  {r.mode:10} {r.ms:11.3f} {ratio:>12}")
    return "\n".join(lines) + "\n"


def _times(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


# -- the command -----------------------------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("file")
    p.add_argument("--net")
    p.add_argument("--shape", default="", help="size symbols, e.g. N=8,H=32,W=32")
    p.add_argument("--dtype", default="f32", choices=("f32", "tf32", "bf16", "f16"),
                   help="activations' dtype (f32 inputs are redeclared); tf32: f32 with "
                        "TF32 convolutions and matmuls")
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also torch.compile (default on a GPU; slow to build on a CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune (default: the default mode)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs on a CPU (default 3)")


def run(args) -> int:
    """The `convdsl bench` command (cli.py registers it)."""
    from .cli import EXIT_OK, UsageError, _parse_shape
    from .parser import read_source

    sizes = _parse_shape(args.shape)
    text, filename = read_source(args.file)
    gpu = torch.cuda.is_available()
    with_compile = gpu if args.compile is None else args.compile
    modes = [m for m in MODES if m != "compile" or with_compile]
    if not gpu:
        print(CPU_WARNING, file=sys.stderr)
        if args.dtype in ("tf32",):
            raise UsageError("--dtype tf32 needs a GPU")
    found = bench_source(text, filename, args.net, sizes, args.dtype, args.backward, modes,
                         repeat=args.repeat, compile_mode=args.compile_mode)
    sys.stdout.write(format_bench(found))
    if not with_compile:
        print("  compile    skipped (pass --compile to build it with torch.compile)")
    return EXIT_OK
