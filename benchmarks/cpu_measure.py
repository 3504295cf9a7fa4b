"""What a CPU can measure (DESIGN.md §5), for every example net:

- compile time: .cdsl text to ready kernel source, forward, training-forward
  and backward lowering (`convdsl.compile(path, net=..., backend="triton")`
  then `net._program.programs(net)`), excluding Triton's own compile
  (target: < 0.5 s a net);
- the cost model: FLOPs and global-memory bytes of the forward kernels and of
  a training step (training forward + backward kernels) at the GPU sizes of
  suite.EXAMPLE_SIZES, with the kernel counts;
- host time per forward: the Python work of one inference forward at those
  sizes with every launch planned as on a GPU (`as_gpu`) and recorded instead
  of run (aot_launch.recording): what each launch costs the host before
  Triton's own launcher — small nets on a GPU are bound by it.

    python benchmarks/cpu_measure.py [--only lenet5] [--repeat 3]

Writes benchmarks/results/cpu_measurements.json and SUMMARY.md (which also
quotes aot_sm_90.json from aot_report.py and aot_launched_sm_90.json from
aot_launched.py, when present)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import RESULTS, compile_quiet, environment, example_nets, write_json
from suite import example_sizes

from convdsl.errors import ConvDSLError

TARGET_S = 0.5
STEP_RATIO = 6  # training-step FLOPs over forward FLOPs worth flagging


def lower_everything(path: Path, name: str):
    net = compile_quiet(path, net=name, backend="triton")
    programs = net._program.programs(net)
    return net, programs


def compile_time(path: Path, name: str, repeat: int) -> dict:
    """Wall and CPU seconds from the text to every kernel's source: the best and the
    median of `repeat` runs (a busy machine inflates wall time; CPU time less so)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        lower_everything(path, name)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s_min": round(min(walls), 4), "wall_s_median": round(statistics.median(walls), 4),
            "cpu_s_min": round(min(cpus), 4)}


def cost(path: Path, name: str) -> dict:
    """Cost-model FLOPs and bytes: forward (inference kernels) and a training step."""
    from convdsl.ir.types import symbol
    from convdsl.triton.families import family

    net, programs = lower_everything(path, name)
    sizes = example_sizes(path.name, net._graph.symbols, smoke=False)
    env = {symbol(k): v for k, v in sizes.items()}

    heaviest = {"flops": -1}

    def total(program, step: bool) -> tuple[int, int, int]:
        flops = nbytes = kernels = 0
        for plan in program.plans:
            if not plan.source:
                continue
            f, b = family(plan.family).cost(plan, program.graph, env)
            flops, nbytes, kernels = flops + int(f), nbytes + int(b), kernels + 1
            if step and f > heaviest["flops"]:
                heaviest.update(flops=int(f), bytes=int(b), kernel=plan.name,
                                family=plan.family)
        return flops, nbytes, kernels

    inference = total(net._program.inference, False)
    # training forward, then the backward programs
    step = [total(p, True) for p in programs[1:]]
    return {"sizes": sizes,
            "forward": dict(zip(("flops", "bytes", "kernels"), inference)),
            "training_step": {"flops": sum(s[0] for s in step), "bytes": sum(s[1] for s in step),
                              "kernels": sum(s[2] for s in step),
                              "heaviest_kernel": heaviest if heaviest["flops"] >= 0 else None},
            "reference_ops": sorted({op for p in programs for op in p.reference_ops()})}


def host_time(path: Path, name: str, repeat: int) -> dict:
    """CPU microseconds of one inference forward's host work, launches recorded
    (best of `repeat` batches of 20), and the launches per forward."""
    import torch

    from convdsl.bench import random_inputs
    from convdsl.triton.aot_launch import recording
    from convdsl.triton.families.base import as_gpu

    net = compile_quiet(path, net=name, backend="triton")
    sizes = example_sizes(path.name, net._graph.symbols, smoke=False)
    inputs = random_inputs(net._graph, sizes, torch.device("cpu"))
    best = float("inf")
    with recording() as launches, as_gpu(), torch.no_grad():
        net(*inputs)  # plans, checks and caches once
        per_forward = len(launches)
        for _ in range(repeat):
            started = time.process_time()
            for _ in range(20):
                net(*inputs)
            best = min(best, (time.process_time() - started) / 20)
    return {"us_per_forward": round(best * 1e6, 1), "launches": per_forward,
            "us_per_launch": round(best * 1e6 / max(per_forward, 1), 1)}


def summary_markdown(doc: dict, aot: dict | None, launched: dict | None = None) -> str:
    env = doc["environment"]
    rows = doc["nets"]
    slowest = max(rows, key=lambda r: r["compile"]["wall_s_min"])
    over = [r for r in rows if r["compile"]["wall_s_min"] >= TARGET_S]
    lines = [
        "# CPU-side measurements",
        "",
        (f"Measured {env['date']} on {env['cpu_count']} CPU cores ({env['cpu']}), "
        f"torch {env['torch']}, Triton {env['triton']}, commit {env['commit']}. "
        "No GPU timings here: see the README's Performance section."),
        "",
        "## Compile time: .cdsl text to ready kernel source",
        "",
        ("Forward, training-forward and backward lowering of every example net, excluding "
        f"Triton's own compile; best of {doc['repeat']} runs (target < {TARGET_S} s a net). "
        f"Load average during the run: {doc['load_average']}."),
        "",
        (f"- Wall time: {len(rows)} nets; {len(over)} at or over {TARGET_S} s; slowest "
         f"{slowest['name']} at {slowest['compile']['wall_s_min']:.3f} s; median "
         f"{statistics.median(r['compile']['wall_s_min'] for r in rows):.3f} s."),
        (f"- CPU time of the same runs (less affected by other processes on a shared "
         f"machine): max {max(r['compile']['cpu_s_min'] for r in rows):.3f} s, median "
         f"{statistics.median(r['compile']['cpu_s_min'] for r in rows):.3f} s."),
        "",
        ("| net | kernels fwd / step | compile s (wall, best) | CPU s | fwd GFLOP | fwd MB | "
        "step GFLOP | step MB |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, f, s = r["compile"], r["cost"]["forward"], r["cost"]["training_step"]
        lines.append(f"| {r['name']} | {f['kernels']} / {s['kernels']} | {c['wall_s_min']:.3f} | "
                     f"{c['cpu_s_min']:.3f} | {f['flops'] / 1e9:.2f} | {f['bytes'] / 1e6:.1f} | "
                     f"{s['flops'] / 1e9:.2f} | {s['bytes'] / 1e6:.1f} |")
    # A training step is about three forwards of work; far more points at a kernel
    # whose algorithm (or cost formula) deserves a look.
    heavy = [r for r in rows if r["cost"]["training_step"]["flops"]
             > STEP_RATIO * max(r["cost"]["forward"]["flops"], 1)]
    if heavy:
        lines += ["", (f"Training steps costing over {STEP_RATIO}x their forward's FLOPs "
                      "(the heaviest kernel named):"), ""]
        for r in heavy:
            k, f = r["cost"]["training_step"]["heaviest_kernel"], r["cost"]["forward"]["flops"]
            lines.append(f"- {r['name']}: step {r['cost']['training_step']['flops'] / 1e9:.1f} "
                         f"GFLOP vs forward {f / 1e9:.2f}; {k['kernel']} ({k['family']}) "
                         f"{k['flops'] / 1e9:.1f} GFLOP")
    lines += ["", "Cost-model sizes per file: benchmarks/suite.py EXAMPLE_SIZES (N = batch).",
              ("A training step is the training forward (which also stores what the backward "
              "reads) plus the backward kernels of the parameters' gradients.")]
    hosts = [r for r in rows if r.get("host")]
    if hosts:
        per_launch = [r["host"]["us_per_launch"] for r in hosts]
        lines += ["", "## Host time per forward", "",
                  ("One inference forward at the GPU sizes, every launch planned as on a GPU "
                   "and recorded instead of run: the Python work per launch before Triton's "
                   "own launcher (CPU time, best of batches). Per launch: median "
                   f"{statistics.median(per_launch):.0f} µs, max {max(per_launch):.0f} µs "
                   f"over {len(hosts)} nets; e.g. "
                   + ", ".join(f"{r['name']} {r['host']['us_per_forward']:.0f} µs for "
                               f"{r['host']['launches']} launches" for r in hosts[:3]) + ".")]
    if launched:
        s = launched["summary"]
        engines = s["default_engines"]
        lines += ["", f"## Layer cases compiled as launched for {launched['target']}", "",
                  (f"Measured {launched['environment']['date']} (commit "
                   f"{launched['environment']['commit']}), {launched['dtype']}, training step "
                   f"with input gradients at the GPU sizes, every autotuning candidate: "
                   f"{s['compiled']} of {s['configs']} configs compiled; default configs "
                   f"spilling: {len(s['default_spilling'])}; candidates spilling: "
                   f"{len(s['candidates_spilling'])}; default configs on wgmma / mma.sync / "
                   f"no tensor cores: {engines['wgmma']} / {engines['mma.sync']} / "
                   f"{engines['none']}; at most {s['max_registers']} registers. Per config: "
                   f"aot_launched_{launched['target']}.json.")]
        for k in s["default_spilling"]:
            lines.append(f"- default spills: {k['case']} {k['name']} {k['config']}: "
                         f"{k['spills']} bytes")
    if aot:
        s = aot["summary"]
        lines += ["", f"## Ahead-of-time compile for {aot['target']}", "",
                  (f"Measured {aot['environment']['date']} (commit "
                  f"{aot['environment']['commit']}): {s['compiled']} of {s['kernels']} distinct "
                  f"example kernels compiled; {len(s['spilling'])} spill (target: zero); "
                  f"at most {s['max_registers']} registers a thread and "
                  f"{s['max_shared_bytes']} bytes of shared memory; "
                  f"{len(s['failed'])} failed to compile. Per kernel: aot_{aot['target']}.json.")]
        if s["spilling"]:
            lines += ["", "Spilling kernels:", ""]
            lines += [f"- {k['where']} {k['name']}: {k['spills']} bytes" for k in s["spilling"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="a substring of the example file names to keep")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "cpu_measurements.json")
    p.add_argument("--summary", type=Path, default=RESULTS / "SUMMARY.md")
    args = p.parse_args(argv)
    nets = [(path, name) for path, name in example_nets()
            if args.only is None or args.only in path.name]
    lower_everything(*nets[0])  # imports and template loading are not a net's cost
    rows = []
    for path, name in nets:
        row = {"name": f"{path.name}:{name}", "compile": compile_time(path, name, args.repeat),
               "cost": cost(path, name)}
        try:
            row["host"] = host_time(path, name, args.repeat)
        except ConvDSLError:  # init=kmeans layers run only after fit_features
            row["host"] = None
        rows.append(row)
        print(f"{row['name']:45} {row['compile']['wall_s_min']:7.3f} s  "
              f"fwd {row['cost']['forward']['flops'] / 1e9:9.3f} GFLOP "
              f"{row['cost']['forward']['bytes'] / 1e6:9.1f} MB", flush=True)
    doc = {"what": "compile time to kernel source and cost-model FLOPs/bytes per example net",
           "environment": environment(), "repeat": args.repeat,
           "load_average": [round(v, 2) for v in os.getloadavg()], "target_s": TARGET_S,
           "nets": rows}
    write_json(args.out, doc)
    aot_path = args.out.parent / "aot_sm_90.json"
    aot = json.loads(aot_path.read_text()) if aot_path.exists() else None
    launched_path = args.out.parent / "aot_launched_sm_90.json"
    launched = json.loads(launched_path.read_text()) if launched_path.exists() else None
    args.summary.write_text(summary_markdown(doc, aot, launched))
    print(f"-> {args.out}, {args.summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
