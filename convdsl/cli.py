"""The `convdsl` command: check, ir, run."""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

from .errors import ConvDSLError, ConvDSLWarning

EXIT_OK, EXIT_USER, EXIT_INTERNAL = 0, 1, 2


class UsageError(Exception):
    """Bad command-line arguments (exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit 2; bad arguments are a user error (1)
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convdsl", description="Compile and run .cdsl convolutional networks.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = sub.add_parser("check", help="parse and check; per net: inputs, outputs, parameters")
    check.add_argument("file")

    ir = sub.add_parser("ir", help="print a net's IR")
    ir.add_argument("file")
    ir.add_argument("--net")
    ir.add_argument("--stage", default="optimized", choices=("parsed", "optimized", "backward"))
    ir.add_argument("--format", default="text", choices=("text", "dot", "json"))

    comp = sub.add_parser("compile", help="write the generated kernels and IR; with --target, "
                                          "compile them ahead of time and report resources")
    comp.add_argument("file")
    comp.add_argument("--net")
    comp.add_argument("-o", "--output", default="convdsl-out", help="output directory")
    comp.add_argument("--target", help="GPU architecture, e.g. sm_80 or sm_90 (no GPU needed)")
    comp.add_argument("--shape", default="", help="sizes for the cost model, e.g. N=8,H=32,W=32 "
                                                  "(unset symbols: 32)")

    run = sub.add_parser("run", help="run a net on random input")
    run.add_argument("file")
    run.add_argument("--net")
    run.add_argument("--shape", default="", help="size symbols, e.g. N=8,H=32,W=32")
    run.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    run.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    run.add_argument("--seed", type=int, default=0)
    return p


def _parse_shape(text: str) -> dict[str, int]:
    sizes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or not name.strip().isidentifier() or not value.strip().isdigit():
            raise UsageError(f"--shape takes NAME=INT pairs separated by commas, got '{item}'")
        if int(value) < 1:
            raise UsageError(f"--shape {name.strip()} must be >= 1")
        sizes[name.strip()] = int(value)
    return sizes


def _compile_quiet(path, **kwargs):
    from .compiler import compile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvDSLWarning)
        net = compile(path, **kwargs)
    for w in caught:
        if issubclass(w.category, ConvDSLWarning):
            print(str(w.message), file=sys.stderr)
    return net


def cmd_check(args) -> int:
    from .builder import build_graph
    from .compiler import load_program

    program = load_program(args.file)
    if not program.nets:
        raise ConvDSLError(f"{args.file} defines no net")
    for name, net_ast in program.nets.items():
        graph, found = build_graph(program, net_ast)
        for w in found:
            print(str(w), file=sys.stderr)
        inputs = ", ".join(f"{graph.node(i).attrs['name']}: {graph.node(i).types[0]}"
                           for i in graph.inputs)
        outputs = ", ".join(str(graph.type_of(r)) for r in graph.outputs)
        total = graph.parameter_count()
        trainable = graph.parameter_count(trainable_only=True)
        frozen = f" ({trainable:,} trainable)" if trainable != total else ""
        print(f"net {name}")
        print(f"  inputs:     {inputs}")
        print(f"  outputs:    {outputs}")
        print(f"  parameters: {total:,}{frozen}")
        print(f"  layers:     {len(graph.layers())}")
    return EXIT_OK


def cmd_ir(args) -> int:
    net = _compile_quiet(args.file, net=args.net, backend="torch")
    sys.stdout.write(net.ir(args.stage, args.format))
    return EXIT_OK


def cmd_run(args) -> int:
    import torch

    from .checks import TORCH_DTYPES

    sizes = _parse_shape(args.shape)
    net = _compile_quiet(args.file, net=args.net, backend=args.backend)
    graph = net._graph
    torch.manual_seed(args.seed)
    inputs = []
    for node_id in graph.inputs:
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
        inputs.append(torch.randn(shape).to(TORCH_DTYPES[declared.dtype]))
    unknown = set(sizes) - set(graph.symbols)
    if unknown:
        raise UsageError(f"--shape names {', '.join(sorted(unknown))}, which no input of net "
                         f"{graph.name} uses (it has: {', '.join(graph.symbols) or 'none'})")
    with torch.no_grad():
        start = time.perf_counter()
        out = net(*inputs)  # the first run also checks and plans
        first = time.perf_counter() - start
        times = []
        for _ in range(max(args.repeat, 0)):
            start = time.perf_counter()
            out = net(*inputs)
            times.append(time.perf_counter() - start)
    outs = out if isinstance(out, tuple) else (out,)
    print(f"net {graph.name} (backend {net.backend})")
    for node_id, x in zip(graph.inputs, inputs):
        print(f"  input  {graph.node(node_id).attrs['name']}: {list(x.shape)} {x.dtype}")
    for index, y in enumerate(outs):
        print(f"  output {index}: {list(y.shape)} {y.dtype}")
    print(f"  first run: {first * 1e3:.2f} ms")
    if times:
        times.sort()
        print(f"  median of {len(times)}: {times[len(times) // 2] * 1e3:.2f} ms")
    return EXIT_OK


def cmd_compile(args) -> int:
    import json
    from pathlib import Path

    from .triton.aot import compile_program, parse_target, report_json

    if args.target is not None:
        try:
            parse_target(args.target)
        except ValueError as err:
            raise UsageError(str(err)) from None
    sizes = _parse_shape(args.shape)
    net = _compile_quiet(args.file, net=args.net, backend="triton")
    net._program.programs(net)  # lower the training and backward kernels too
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    for stage in ("parsed", "optimized"):
        (outdir / f"ir.{stage}.txt").write_text(net.ir(stage))
    for name, source in net.kernels.items():
        (outdir / f"{name}.py").write_text(source)
    print(f"net {net.name}: {len(net.kernels)} kernels written to {outdir}/")
    if args.target is None:
        return EXIT_OK
    env = {s: sizes.get(s, 32) for s in net._graph.symbols}
    reports = compile_program(net._program, args.target, outdir, env)
    doc = report_json(args.target, reports, env)
    (outdir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'kernel':40} {'dir':8} {'regs':>5} {'spills':>6} {'smem':>7} {'MFLOP':>9} {'MB':>8}")
    for r in reports:
        print(f"{r.name:40} {r.direction:8} {r.registers!s:>5} {r.spills!s:>6} "
              f"{r.shared_bytes:>7} {r.flops / 1e6:>9.3f} {r.bytes / 1e6:>8.3f}")
    print(f"report: {outdir / 'report.json'}")
    return EXIT_OK


COMMANDS = {"check": cmd_check, "ir": cmd_ir, "compile": cmd_compile, "run": cmd_run}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConvDSLError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USER
    except UsageError as err:
        print(f"convdsl: error: {err}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a compiler bug: say so plainly, details on request
        print(f"convdsl: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        if os.environ.get("CONVDSL_DEBUG"):
            traceback.print_exc()
        else:
            print("  (set CONVDSL_DEBUG=1 for the traceback; please report this)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
