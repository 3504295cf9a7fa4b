"""Ahead-of-time compile report for every kernel the example nets produce
(forward, training-forward and backward), for one GPU target, with no GPU.

    python benchmarks/aot_report.py --target sm_90

Writes benchmarks/results/aot_<target>.json: per kernel its registers,
spills (stack + local bytes per thread; the target is zero) and shared memory,
with a summary. Takes several minutes (hundreds of kernels through ptxas)."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, compile_quiet, environment, example_nets, write_json


def example_jobs(nets) -> list[dict]:
    """One compile job per distinct kernel (by source and name), tagged with the
    first file:net:direction that produces it."""
    from convdsl.triton.aot import plan_jobs

    jobs, seen = [], set()
    for path, name in nets:
        net = compile_quiet(path, net=name, backend="triton")
        for program in net._program.programs(net):
            for plan in program.plans:
                if not plan.source:
                    continue
                for job in plan_jobs(plan, program.graph):
                    key = (job["source"], job["name"])
                    if key in seen:
                        continue
                    seen.add(key)
                    jobs.append({**job, "where": f"{path.name}:{name}:{plan.direction}",
                                 "family": plan.family, "file": path.name})
    return jobs


def compile_jobs(jobs: list[dict], capability: int, workdir: Path) -> list[dict]:
    """Compile in batches (one batch per example file), so a kernel that fails
    to compile costs its batch a row of errors, not the whole report."""
    from convdsl.triton.aot import compile_many, resource_usage

    rows = []
    by_file: dict[str, list[dict]] = {}
    for job in jobs:
        by_file.setdefault(job["file"], []).append(job)
    for file, batch in by_file.items():
        started = time.perf_counter()
        request = [{k: job[k] for k in ("source", "name", "signature", "constexprs", "options")}
                   for job in batch]
        try:
            results = compile_many(request, capability)
        except RuntimeError as err:
            results = [None] * len(batch)
            error = str(err).strip().splitlines()[-1] if str(err).strip() else "failed"
        for job, result in zip(batch, results):
            row = {"name": job["name"], "where": job["where"], "family": job["family"]}
            if result is None:
                row.update(registers=None, spills=None, shared_bytes=None, error=error)
            else:
                registers, spills = resource_usage(result["cubin"], job["name"], workdir)
                row.update(registers=registers, spills=spills, shared_bytes=result["shared"])
            rows.append(row)
        print(f"{file:28} {len(batch):4} kernels  {time.perf_counter() - started:6.1f} s",
              flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    compiled = [r for r in rows if r.get("registers") is not None]
    spilling = [r for r in compiled if r["spills"]]
    return {"kernels": len(rows), "compiled": len(compiled),
            "failed": [r["name"] for r in rows if r.get("error")],
            "spilling": [{"name": r["name"], "where": r["where"], "spills": r["spills"]}
                         for r in spilling],
            "max_registers": max((r["registers"] for r in compiled), default=None),
            "max_shared_bytes": max((r["shared_bytes"] for r in compiled), default=None)}


def main(argv=None) -> int:
    from convdsl.triton.aot import parse_target

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="sm_90")
    p.add_argument("--only", help="a substring of the example file names to keep")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    capability = parse_target(args.target)
    nets = [(path, name) for path, name in example_nets()
            if args.only is None or args.only in path.name]
    started = time.perf_counter()
    jobs = example_jobs(nets)
    print(f"{len(jobs)} distinct kernels from {len(nets)} nets", flush=True)
    with tempfile.TemporaryDirectory(prefix="convdsl-aot-") as tmp:
        rows = compile_jobs(jobs, capability, Path(tmp))
    doc = {"what": f"ahead-of-time compile of every example kernel for {args.target}",
           "environment": environment(), "target": args.target,
           "seconds": round(time.perf_counter() - started, 1),
           "summary": summary(rows), "kernels": rows}
    out = args.out or RESULTS / f"aot_{args.target}.json"
    write_json(out, doc)
    s = doc["summary"]
    print(f"{s['compiled']}/{s['kernels']} compiled, {len(s['spilling'])} spilling, "
          f"max {s['max_registers']} registers; {doc['seconds']} s -> {out}")
    return 0 if not s["failed"] and not s["spilling"] else 1


if __name__ == "__main__":
    sys.exit(main())
