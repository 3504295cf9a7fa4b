"""The `convdsl` command: check, ir, run."""
from __future__ import annotations

import argparse
import math
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
    ir.add_argument("--format", default="text", choices=("text", "dot", "json", "svg"),
                    help="svg: the dot output drawn by Graphviz (needs `dot` on PATH)")
    ir.add_argument("--passes", action="store_true", help="list the optimizer's passes in order")
    ir.add_argument("--print-after", action="append", default=[], metavar="PASS",
                    help="print the IR after PASS and what it changed (repeatable)")
    ir.add_argument("--print-after-all", action="store_true",
                    help="print the IR after every pass and what it changed")
    ir.add_argument("--no-opt", action="store_true", help="turn the optimizer off")
    ir.add_argument("--cost", action="store_true",
                    help="FLOPs, bytes and kernels per kernel, without and with the optimizer")
    ir.add_argument("--shape", default="", help="sizes for --cost, e.g. N=8,H=32 (unset: 32)")

    comp = sub.add_parser("compile", help="write the generated kernels and IR; with --target, "
                                          "compile them ahead of time and report resources")
    comp.add_argument("file")
    comp.add_argument("--net")
    comp.add_argument("-o", "--output", default="convdsl-out", help="output directory")
    comp.add_argument("--target", help="GPU architecture, e.g. sm_80 or sm_90 (no GPU needed)")
    comp.add_argument("--shape", default="", help="sizes for the cost model, e.g. N=8,H=32,W=32 "
                                                  "(unset symbols: 32)")
    comp.add_argument("--as-launched", action="store_true",
                      help="with --target: compile every kernel as a GPU launch at --shape "
                           "specializes it (unit strides constant, alignment facts), each "
                           "autotuning candidate too; no GPU needed")

    exp = sub.add_parser("explore", help="write one HTML page: source, IR after each pass, "
                                         "kernels with their cost, all linked")
    exp.add_argument("file")
    exp.add_argument("--net")
    exp.add_argument("-o", "--output", default="explore.html", help="the page to write")
    exp.add_argument("--shape", default="", help="sizes for the cost model, e.g. N=8,H=32 "
                                                 "(unset symbols: 32)")
    exp.add_argument("--target", help="also compile ahead of time for e.g. sm_90 (slow)")

    run = sub.add_parser("run", help="run a net on random input")
    run.add_argument("file")
    run.add_argument("--net")
    run.add_argument("--shape", default="", help="size symbols, e.g. N=8,H=32,W=32")
    run.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    run.add_argument("--repeat", type=int, default=3, help="timed runs (default 3)")
    run.add_argument("--seed", type=int, default=0)

    draw = sub.add_parser("draw", help="draw a layer's kernels as a PNG image grid")
    draw.add_argument("file")
    draw.add_argument("--net")
    draw.add_argument("--layer", required=True, help="the layer name, as in the state_dict keys")
    draw.add_argument("-o", "--output", default="kernels.png", help="the PNG to write")
    draw.add_argument("--state", help="weights to draw: a state_dict saved with torch.save")
    draw.add_argument("--fit", help="inputs saved with torch.save: fit init=kmeans layers first")
    draw.add_argument("--channels", default="auto", choices=("auto", "tiles", "mean"),
                      help="multi-channel kernels: a tile per channel, or their mean "
                           "(auto: tiles up to 16)")
    draw.add_argument("--scale", type=int, help="pixels per kernel value (default: ~32 px tiles)")

    from .bench import add_arguments as bench_arguments  # convdsl bench: see bench.py
    bench_arguments(sub.add_parser("bench", help="time the generated kernels against PyTorch "
                                                 "eager and torch.compile"))
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
    from .passes import BACKWARD_PIPELINE, PIPELINE

    if args.passes:
        for label, passes in (("forward", PIPELINE), ("backward", BACKWARD_PIPELINE)):
            print(f"{label} graph:")
            for p in passes:
                print(f"  {p.name:26} {p.doc}")
        return EXIT_OK
    if args.cost:
        from .cost import compare, format_comparison

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvDSLWarning)
            result = compare(args.file, args.net, _parse_shape(args.shape))
        sys.stdout.write(format_comparison(result))
        return EXIT_OK
    if args.print_after or args.print_after_all:
        if args.format == "svg":
            raise UsageError("--print-after prints text, dot or json, not svg")
        return _print_after(args, [*PIPELINE, *BACKWARD_PIPELINE])
    net = _compile_quiet(args.file, net=args.net, backend="torch", optimize=not args.no_opt)
    if args.format == "svg":  # the dot text through Graphviz
        from .pictures import dot_to_svg

        sys.stdout.write(dot_to_svg(net.ir(args.stage, "dot")))
        return EXIT_OK
    sys.stdout.write(net.ir(args.stage, args.format))
    return EXIT_OK


def _print_after(args, passes) -> int:
    """The IR after the chosen passes, each with a diff against the IR before it."""
    from .passes import trace_passes

    known = [p.name for p in passes]
    for name in args.print_after:
        if name not in known:
            raise UsageError(f"--print-after: unknown pass '{name}'; passes: {', '.join(known)}")
    net = _compile_quiet(args.file, net=args.net, backend="torch", optimize=False)
    for step in trace_passes(net, args.format):
        if args.print_after_all or step.name in args.print_after:
            state = "changed" if step.changed else "no change"
            print(f"// ----- IR after {step.name} ({state}) -----")
            sys.stdout.write(step.text)
            if step.changed:
                print(f"// ----- diff {step.name} -----")
                sys.stdout.write(step.diff)
    return EXIT_OK


def cmd_run(args) -> int:
    import torch

    from .bench import concrete_shape
    from .checks import TORCH_DTYPES
    from .limits import max_tensor_elements

    sizes = _parse_shape(args.shape)
    net = _compile_quiet(args.file, net=args.net, backend=args.backend)
    graph = net._graph
    torch.manual_seed(args.seed)
    inputs = []
    for node_id in graph.inputs:
        declared = graph.node(node_id).types[0]
        shape = concrete_shape(graph, node_id, sizes)
        if math.prod(shape) > max_tensor_elements():  # refuse before torch tries to allocate
            raise UsageError(f"input '{graph.node(node_id).attrs['name']}' of shape {shape} is too "
                             f"large to make up ({math.prod(shape):,} elements)")
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
    elif args.as_launched:
        raise UsageError("--as-launched needs --target, e.g. --target sm_90")
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
    cost = _cost_summary(args.file, args.net, sizes)
    (outdir / "cost.txt").write_text(cost["text"])
    sys.stdout.write(cost["text"])
    if args.target is None:
        return EXIT_OK
    env = {s: sizes.get(s, 32) for s in net._graph.symbols}
    if args.as_launched:
        return _compile_as_launched(net, args.target, outdir, env, cost)
    reports = compile_program(net._program, args.target, outdir, env)
    doc = report_json(args.target, reports, env)
    doc["cost_model"] = cost["totals"]
    (outdir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'kernel':40} {'dir':8} {'regs':>5} {'spills':>6} {'smem':>7} {'MFLOP':>9} {'MB':>8}")
    for r in reports:
        print(f"{r.name:40} {r.direction:8} {r.registers!s:>5} {r.spills!s:>6} "
              f"{r.shared_bytes:>7} {r.flops / 1e6:>9.3f} {r.bytes / 1e6:>8.3f}")
    print(f"report: {outdir / 'report.json'}")
    return EXIT_OK


def _compile_as_launched(net, target: str, outdir, env: dict, cost: dict) -> int:
    """`convdsl compile --as-launched`: record a training step's launches at
    `env` as on a GPU (every autotuning candidate) and compile each distinct one."""
    import json

    from .triton.aot_launch import compile_launches, record_net, report_json

    reports = compile_launches(record_net(net, env), target, outdir)
    doc = report_json(target, env, reports)
    doc["cost_model"] = cost["totals"]
    (outdir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{'kernel':40} {'config':34} {'regs':>5} {'spills':>6} {'smem':>7}  tensor cores")
    for r in reports:
        config = " ".join(f"{k.replace('BLOCK_', '').lower()}={v}" for k, v in r.config.items())
        mma = ("wgmma" if r.features["wgmma"] else "mma.sync" if r.features["mma_sync"]
               else "-")
        print(f"{r.name:40} {config + (' *' if r.default else ''):34} {r.registers!s:>5} "
              f"{r.spills!s:>6} {r.shared_bytes:>7}  {mma}")
    print("* the default config; the others are autotuning candidates")
    print(f"report: {outdir / 'report.json'}")
    return EXIT_OK


def _cost_summary(path, net_name, sizes) -> dict:
    """The cost model's totals without and with the optimizer (text and JSON)."""
    from dataclasses import asdict

    from .cost import compare, format_comparison

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvDSLWarning)
        result = compare(path, net_name, sizes)
    totals = {label: {k: asdict(v) for k, v in result[label]["totals"].items()}
              for label in ("unoptimized", "optimized")}
    return {"text": format_comparison(result, verbose=False), "totals": totals}


def cmd_explore(args) -> int:
    from .explore import write_report

    sizes = _parse_shape(args.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvDSLWarning)
        found = write_report(args.file, args.output, net=args.net, sizes=sizes,
                             target=args.target)
    for w in caught:
        if issubclass(w.category, ConvDSLWarning):
            print(str(w.message), file=sys.stderr)
    print(f"net {found.net}: {len(found.stages)} IR stages, {len(found.kernels)} kernel plans "
          f"written to {args.output}")
    return EXIT_OK


def cmd_draw(args) -> int:
    from .pictures import draw_command

    if args.scale is not None and args.scale < 1:
        raise UsageError("--scale must be >= 1")
    net = _compile_quiet(args.file, net=args.net, backend="torch")
    print(draw_command(net, args.layer, args.output, state=args.state, fit=args.fit,
                       channels=args.channels, scale=args.scale))
    return EXIT_OK


def cmd_bench(args) -> int:
    from .bench import run

    return run(args)


COMMANDS = {"check": cmd_check, "ir": cmd_ir, "compile": cmd_compile, "run": cmd_run,
            "explore": cmd_explore, "bench": cmd_bench, "draw": cmd_draw}


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
