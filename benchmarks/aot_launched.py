"""Ahead-of-time compile of the benchmark layer cases *as launched* at their GPU
sizes, every autotuning candidate, for one target, with no GPU.

    python benchmarks/aot_launched.py --target sm_90 [--dtype bf16] [--only conv]

Each case of suite.CASES runs one training step (input gradients too) on
uninitialized host tensors
inside `as_gpu(every_candidate=True)` with its launches recorded
(convdsl/triton/aot_launch.py); each distinct launch is specialized as Triton's
JIT would (unit strides constant, divisibility-16 facts) and compiled. Writes
benchmarks/results/aot_launched_<target>.json: per config its registers,
spills, shared memory and what its PTX uses (wgmma, mma.sync, vector loads,
cp.async), with a summary: which kernels' default configs spill, and which
tensor-core kernels run mma.sync rather than wgmma. About 10 minutes on 2 cores."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from common import RESULTS, compile_quiet, environment, write_json
from suite import CASES


def case_rows(case, dtype: str, target: str, workdir: Path) -> list[dict]:
    from convdsl.triton.aot_launch import compile_launches, record_net

    net = compile_quiet(case.net(dtype, case.sizes), backend="triton")
    env = {k: v for k, v in case.sizes.items() if k == "N"}
    reports = compile_launches(record_net(net, env, input_grads=True), target, progress=False)
    return [{"case": case.name, "group": case.group, "dtype": dtype, **asdict(r)}
            for r in reports]


def summary(rows: list[dict]) -> dict:
    compiled = [r for r in rows if r.get("registers") is not None]
    defaults = [r for r in compiled if r["default"]]

    def engine(r) -> str:
        f = r["features"]
        return "wgmma" if f["wgmma"] else "mma.sync" if f["mma_sync"] else "none"

    # Tensor-core kernels on the older mma.sync: tiles under 64 rows (wgmma's
    # minimum per warpgroup), as local, tiled, deconv and tables take.
    on_mma_sync = sorted({f"{r['case']}:{r['name']}" for r in defaults
                          if engine(r) == "mma.sync"})
    return {"configs": len(rows), "compiled": len(compiled),
            "failed": [f"{r['case']}:{r['name']}" for r in rows if r.get("error")],
            "default_configs": len(defaults),
            "default_spilling": [{"case": r["case"], "name": r["name"], "spills": r["spills"],
                                  "config": r["config"]} for r in defaults if r["spills"]],
            "candidates_spilling": [{"case": r["case"], "name": r["name"], "spills": r["spills"],
                                     "config": r["config"]}
                                    for r in compiled if not r["default"] and r["spills"]],
            "default_engines": {e: sum(engine(r) == e for r in defaults)
                                for e in ("wgmma", "mma.sync", "none")},
            "tensor_core_defaults_on_mma_sync": on_mma_sync,
            "max_registers": max((r["registers"] for r in compiled), default=None)}


def main(argv=None) -> int:
    from convdsl.triton.aot import parse_target

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="sm_90")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "f16", "f32"))
    p.add_argument("--only", help="a substring of the case names to keep")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    parse_target(args.target)
    cases = [c for c in CASES if args.only is None or args.only in c.name]
    started = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="convdsl-aot-launched-") as tmp:
        for case in cases:
            dtype = args.dtype if args.dtype in case.dtypes or args.dtype == "f32" else "f32"
            begun = time.perf_counter()
            try:
                found = case_rows(case, dtype, args.target, Path(tmp))
            except Exception as err:  # noqa: BLE001  (one case's failure is a row, not the end)
                found = [{"case": case.name, "group": case.group, "dtype": dtype,
                          "registers": None, "error": f"{type(err).__name__}: {err}"[:300]}]
            rows.extend(found)
            print(f"{case.name:34} {len(found):3} configs {time.perf_counter() - begun:6.1f} s",
                  flush=True)
    doc = {"what": f"layer cases compiled as launched at their GPU sizes for {args.target}, "
                   "every autotuning candidate",
           "environment": environment(), "target": args.target, "dtype": args.dtype,
           "seconds": round(time.perf_counter() - started, 1),
           "summary": summary(rows), "configs": rows}
    out = args.out or RESULTS / f"aot_launched_{args.target}.json"
    write_json(out, doc)
    s = doc["summary"]
    print(f"{s['compiled']}/{s['configs']} configs compiled; default configs spilling: "
          f"{len(s['default_spilling'])}; candidates spilling: {len(s['candidates_spilling'])}; "
          f"default configs on wgmma / mma.sync / no tensor cores: "
          f"{'/'.join(str(n) for n in s['default_engines'].values())}; "
          f"{doc['seconds']} s -> {out}")
    return 0 if not s["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
