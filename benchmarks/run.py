"""The benchmark harness: the layer cases of suite.py and the example nets,
timed against PyTorch eager (cuDNN), torch.compile and torch.compile
max-autotune in the same run.

    python benchmarks/run.py                      # on a GPU: the whole suite
    python benchmarks/run.py --warm 12 --budget 300
    python benchmarks/run.py --cpu-smoke          # on a CPU: tiny shapes, interpreter

Prints a table of ratios and writes every figure, with the device, driver,
versions and date, to benchmarks/results/ as JSON. Jobs run in priority order
(the targets' cases first) until the time budget is spent; what did not fit
is recorded as skipped. `--warm K` first runs every job once in K parallel
processes, untimed, so the Triton and Inductor compile caches are warm when
the timed pass starts (the autotuner's choices from that contended pass are
thrown away)."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, environment, example_nets, write_json
from jobs import Job, Runner
from report import format_targets, peak_bandwidth, table, targets
from suite import BY_NAME, CASES, example_sizes

import convdsl.triton  # noqa: F401  (chooses Triton's interpreter before Triton loads)

GPU_CONTENDERS = ("triton", "eager", "compile")
SMOKE_CONTENDERS = ("triton", "convdsl_torch", "eager")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on the CPU: the interpreter, the torch backend, eager")
    p.add_argument("--cases", default="all",
                   help="comma-separated case names or substrings, 'all' or 'none'")
    p.add_argument("--examples", default="all",
                   help="comma-separated example files or file:Net, 'all' or 'none'")
    p.add_argument("--dtypes", help="comma-separated subset of f32,tf32,bf16")
    p.add_argument("--directions", default="fwd,fwd+bwd")
    p.add_argument("--no-max-autotune", dest="max_autotune", action="store_false")
    p.add_argument("--contenders", help="comma-separated, replacing each job's own list "
                                        "(triton, convdsl_torch, eager, compile, max_autotune)")
    p.add_argument("--budget", type=float, help="seconds for the timed pass (GPU default 330)")
    p.add_argument("--warm", type=int, default=0, help="parallel untimed warm-up processes")
    p.add_argument("--warm-budget", type=float, default=150.0)
    p.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="timed runs per contender on a CPU")
    p.add_argument("--out", type=Path, help="the JSON to write (default benchmarks/results/)")
    return p.parse_args(argv)


# -- the jobs -----------------------------------------------------------------------------------

def _selected(spec: str, names) -> list:
    if spec == "none":
        return []
    if spec == "all":
        return list(names)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    return [n for n in names if any(w == n or w in n for w in wanted)]


def build_jobs(args, smoke: bool) -> list[Job]:
    directions = [d.strip() for d in args.directions.split(",")]
    only = set(args.dtypes.split(",")) if args.dtypes else None
    jobs: list[Job] = []
    for name in _selected(args.cases, [c.name for c in CASES]):
        case = BY_NAME[name]
        dtypes = [d for d in (("f32",) if smoke else case.dtypes) if only is None or d in only]
        for rank, dtype in enumerate(dtypes):
            for backward in (False, True):
                if ("fwd+bwd" if backward else "fwd") not in directions:
                    continue
                contenders = SMOKE_CONTENDERS if smoke else GPU_CONTENDERS
                jobs.append(Job("layer", name, dtype, backward, contenders,
                                case.priority + 2 * rank + backward, case.group))
        if case.max_autotune and args.max_autotune and not smoke and dtypes and \
                "fwd" in directions:
            jobs.append(Job("layer", name, dtypes[0], False, ("max_autotune",),
                            4 + case.priority, case.group))
    nets = [f"{path.name}:{net}" for path, net in example_nets()]
    for name in _selected(args.examples, nets):
        plan = [("f32", True, 1.5), ("f32", False, 3.5)] if smoke else \
            [("tf32", True, 1.5), ("tf32", False, 3.5), ("bf16", True, 4.5), ("f32", True, 6.5)]
        for dtype, backward, priority in plan:
            if ("fwd+bwd" if backward else "fwd") not in directions:
                continue
            if only is not None and dtype not in only:
                continue
            contenders = ("triton", "eager") if smoke else GPU_CONTENDERS
            jobs.append(Job("net", name, dtype, backward, contenders, priority, "example"))
    return sorted(jobs, key=lambda j: j.priority)  # stable: suite order within a priority


def builder(runner: Runner, job: Job):
    if job.kind == "layer":
        return lambda: runner.layer(job, BY_NAME[job.name])
    file, net = job.name.split(":")
    path = next(p for p, n in example_nets() if p.name == file and n == net)
    return lambda: runner.example(job, path, net, example_sizes)


# -- measuring ----------------------------------------------------------------------------------

def copy_bandwidth(device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written): the memory
    bandwidth a bandwidth-bound kernel can reach here."""
    if device.type != "cuda":
        return None
    from convdsl.bench import time_gpu

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src))
    return round(2 * src.numel() * 4 / ms / 1e6, 1)


def warm_up(args, workers: int) -> dict:
    """Run every job once in `workers` processes, untimed, to fill the compile
    caches; the autotuner's (contended) choices go to a throwaway directory."""
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="convdsl-warm-")
    env = {**os.environ, "CONVDSL_CACHE_DIR": scratch, "PYTHONUNBUFFERED": "1"}
    selection = [f"--cases={args.cases}", f"--examples={args.examples}",
                 f"--directions={args.directions}"]
    selection += [f"--dtypes={args.dtypes}"] if args.dtypes else []
    selection += [f"--contenders={args.contenders}"] if args.contenders else []
    selection += ["--cpu-smoke"] if args.cpu_smoke else []
    procs = [subprocess.Popen([sys.executable, __file__, *selection, "--warm-only",
                               f"--shard={i}/{workers}", f"--budget={args.warm_budget}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for i in range(workers)]
    failures = []
    for proc in procs:
        left = max(1.0, args.warm_budget + 30 - (time.monotonic() - started))
        try:
            _, err = proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            proc.kill()  # a process this function started
            _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(err.strip().splitlines()[-1:] if err.strip() else [proc.returncode])
    return {"workers": workers, "seconds": round(time.monotonic() - started, 1),
            "failed_workers": failures}


def autotuned(device) -> dict:
    """The launch configs the autotuner chose in this run (and earlier ones on this machine)."""
    if device.type != "cuda":
        return {}
    from convdsl.triton import autotune

    name = autotune.device_name(device)
    return {"file": str(autotune.TUNER.path(name)), "entries": autotune.TUNER.load(name)}


def merge(outcomes) -> list[dict]:
    """One row per (case, dtype, direction): a max-autotune job joins its row."""
    rows: dict[str, dict] = {}
    for outcome in outcomes:
        found = outcome.as_json()
        case = BY_NAME.get(found["name"])
        found["bandwidth_bound"] = bool(case and case.bandwidth_bound)
        found["baseline"] = case.baseline if case else "torch backend (one PyTorch call per op)"
        row = rows.get(found["key"])
        if row is None:
            rows[found["key"]] = found
            continue
        for part in ("ms", "errors"):
            row[part].update(found[part])
        row["skipped"] += found["skipped"]
        row["seconds"] = round(row["seconds"] + found["seconds"], 2)
    return list(rows.values())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Smoke runs take tiny shapes; on a machine with a GPU they run there, since
    # Triton there compiles kernels instead of interpreting them.
    smoke = args.cpu_smoke
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        print("no GPU here: run with --cpu-smoke (tiny shapes, interpreter) or on a GPU",
              file=sys.stderr)
        return 1
    device = torch.device("cuda" if gpu else "cpu")
    jobs = build_jobs(args, smoke=smoke)
    if args.contenders:
        for job in jobs:
            job.contenders = tuple(c.strip() for c in args.contenders.split(","))
    index, count = (int(v) for v in args.shard.split("/"))
    jobs = jobs[index::count]
    if args.warm_only:  # max-autotune benchmarks its choices: never under contention
        for job in jobs:
            job.contenders = tuple(c for c in job.contenders if c != "max_autotune")
    warm = warm_up(args, args.warm) if args.warm and not smoke and not args.warm_only \
        else None

    budget = args.budget if args.budget is not None else (math.inf if smoke else 330.0)
    started = time.monotonic()
    runner = Runner(device, started + budget, args.repeat, smoke=smoke, warm_only=args.warm_only)
    bandwidth = None if args.warm_only else copy_bandwidth(device)
    outcomes = []
    for number, job in enumerate(jobs, 1):
        if runner.left() <= 0:
            from jobs import Outcome

            outcomes.append(Outcome(job, skipped=list(job.contenders)))
            continue
        outcome = runner.run(job, builder(runner, job))
        outcomes.append(outcome)
        if not args.warm_only:
            times = " ".join(f"{m} {v:.4f}" for m, v in outcome.ms.items())
            print(f"[{number:3}/{len(jobs)} {time.monotonic() - started:6.1f} s] {job.key:55} "
                  f"{times}{'  errors: ' + ', '.join(outcome.errors) if outcome.errors else ''}",
                  flush=True)
    if args.warm_only:
        return 0

    env = environment()
    note = None
    if smoke:
        note = ("smoke run: tiny shapes" + ("" if gpu else ", the generated kernels under "
                "Triton's interpreter") + "; these timings say nothing about performance")
    doc = {"what": "convdsl benchmark suite (benchmarks/run.py)",
           "mode": "smoke" if smoke else "gpu", "note": note,
           "command": "python benchmarks/run.py " + " ".join(argv),
           "environment": env, "budget_s": None if math.isinf(budget) else budget,
           "elapsed_s": round(time.monotonic() - started, 1), "warm_up": warm,
           "copy_bandwidth_gbs": bandwidth, "peak_bandwidth_gbs": peak_bandwidth(env["device"]),
           "ratios": "baseline median ms / triton median ms (above 1: the generated kernels "
                     "are faster)",
           "jobs": merge(outcomes), "autotuned": autotuned(device)}
    doc["targets"] = targets(doc)
    out = args.out or RESULTS / _default_name(env, smoke)
    write_json(out, doc)
    sys.stdout.write(table(doc))
    sys.stdout.write(format_targets(doc["targets"]))
    print(f"results: {out}")
    mismatches = [j["key"] for j in doc["jobs"] if j.get("check") and not j["check"].get("ok")]
    if mismatches:
        print(f"MISMATCH against the reference: {', '.join(mismatches)}", file=sys.stderr)
    return 1 if mismatches else 0


def _default_name(env: dict, smoke: bool) -> str:
    day = datetime.date.today().isoformat()
    device = "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
    return f"{'smoke' if smoke else 'bench'}-{device}-{day}.json"


if __name__ == "__main__":
    sys.exit(main())
