"""Reading a results file: the table of ratios, and issue 7's targets.

    python benchmarks/report.py benchmarks/results/gpu-....json

Ratios are "how many times faster the generated kernels are": a baseline's
median time over the triton contender's, both measured in the same run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Published peak memory bandwidth (GB/s) by device name, for "% of HBM".
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H200": 4800, "A100-SXM4-80GB": 2039,
                  "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}
BASELINES = ("eager", "compile", "max_autotune")


def peak_bandwidth(device: str) -> float | None:
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in device), None)


def ratio(job: dict, baseline: str) -> float | None:
    mine, theirs = job["ms"].get("triton"), job["ms"].get(baseline)
    return theirs / mine if mine and theirs else None


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def throughput(job: dict, doc: dict) -> str:
    """GB/s for bandwidth-bound cases, TFLOP/s for the rest (cost model, forward only)."""
    ms = job["ms"].get("triton")
    if not ms or job["direction"] != "fwd" or doc.get("mode") == "smoke":
        return ""
    if job.get("bandwidth_bound") and job.get("bytes"):
        return f"{job['bytes'] / ms / 1e6:8.0f} GB/s"
    if job.get("flops"):
        return f"{job['flops'] / ms / 1e9:7.1f} TF/s"
    return ""


def _cell(value: float | None, fmt: str = "{:6.2f}x") -> str:
    return fmt.format(value) if value is not None else "     -"


def table(doc: dict) -> str:
    header = (f"{'case':42} {'dtype':5} {'dir':7} {'triton ms':>10} {'xeager':>7} "
              f"{'xcompile':>8} {'xmax-at':>7} {'throughput':>13}  check")
    lines = [header]
    for job in doc["jobs"]:
        ms = job["ms"].get("triton")
        check = job.get("check") or {}
        status = ("ok" if check.get("ok") else "MISMATCH" if check else "")
        problems = {**job.get("errors", {}), **{m: "skipped" for m in job.get("skipped", [])}}
        if problems:
            status += " " + ", ".join(f"{k}: {v.split(':')[0]}" for k, v in problems.items())
        lines.append(f"{job['name'][:42]:42} {job['dtype']:5} {job['direction']:7} "
                     f"{_cell(ms, '{:10.4f}'):>10} {_cell(ratio(job, 'eager')):>7} "
                     f"{_cell(ratio(job, 'compile')):>8} {_cell(ratio(job, 'max_autotune')):>7} "
                     f"{throughput(job, doc):>13}  {status}")
    return "\n".join(lines) + "\n"


# -- issue 7's targets --------------------------------------------------------------------------

def _jobs(doc, group=None, kind="layer", dtype=None, direction=None, names=None):
    return [j for j in doc["jobs"] if j["kind"] == kind and (group is None or j["group"] == group)
            and (dtype is None or j["dtype"] == dtype)
            and (direction is None or j["direction"] == direction)
            and (names is None or any(n in j["name"] for n in names))]


def _target(name: str, goal: float, value: float | None, per_case: dict, how: str) -> dict:
    met = value is not None and value >= goal
    found = {"target": name, "goal": goal, "value": None if value is None else round(value, 3),
             "met": met, "how": how, "per_case": {k: None if v is None else round(v, 3)
                                                  for k, v in per_case.items()}}
    if value is None:
        found["why"] = "not measured in this run"
    elif not met:
        found["shortfall"] = f"{value / goal:.0%} of the goal ({goal / value:.2f}x short)"
        found["why"] = "to be analysed: see the per-case ratios and kernels of the jobs"
    return found


def _ratios(jobs, baseline) -> dict:
    return {j["name"]: ratio(j, baseline) for j in jobs}


def targets(doc: dict) -> list[dict]:
    found = []
    conv = _ratios(_jobs(doc, "conv", dtype="bf16", direction="fwd"), "eager")
    found.append(_target("plain conv forward vs cuDNN (geomean, ResNet-style layers, bf16)", 0.9,
                         geomean(conv.values()), conv, "eager / triton median time"))
    for baseline, goal in (("eager", 1.5), ("max_autotune", 1.2)):
        block = _ratios(_jobs(doc, "fused_block", dtype="bf16", direction="fwd"), baseline)
        found.append(_target(f"conv+bias+relu+maxpool fused vs {baseline} (bf16)", goal,
                             min((v for v in block.values() if v), default=None), block,
                             f"{baseline} / triton, worst case"))
    for group, goal, what in (("separable", 2.5, "separable 7x7+ vs cuDNN dense"),
                              ("depthwise", 1.5, "depthwise vs cuDNN"),
                              ("dw_pw", 1.5, "depthwise + pointwise vs eager")):
        per = _ratios(_jobs(doc, group, dtype="bf16", direction="fwd"), "eager")
        found.append(_target(f"{what} (bf16)", goal, min((v for v in per.values() if v),
                                                         default=None), per, "worst case"))
    local = _ratios(_jobs(doc, "local", direction="fwd"), "eager")
    found.append(_target("local vs unfold + einsum", 10.0,
                         min((v for v in local.values() if v), default=None), local,
                         "worst case over dtypes"))
    copy = doc.get("copy_bandwidth_gbs")
    per = {}
    for j in _jobs(doc, "pool", direction="fwd"):
        ms = j["ms"].get("triton")
        if ms and j.get("bytes") and copy:
            per[f"{j['name']}|{j['dtype']}"] = j["bytes"] / ms / 1e6 / copy
    found.append(_target("bandwidth-bound kernels vs the device's copy bandwidth", 0.8,
                         min(per.values(), default=None), per,
                         "cost-model bytes / time, over a device-to-device copy's GB/s"))
    nets = _ratios(_jobs(doc, kind="net", direction="fwd+bwd"), "eager")
    found.append(_target("example nets forward+backward vs eager (geomean)", 1.0,
                         geomean(nets.values()), nets, "eager (torch backend) / triton"))
    return found


def format_targets(found: list[dict]) -> str:
    lines = ["targets (issue 7):"]
    for t in found:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        mark = "met" if t["met"] else "MISSED" if t["value"] is not None else "-"
        lines.append(f"  {mark:6} {t['target']}: {value} (goal >= {t['goal']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 1
    doc = json.loads(Path(argv[0]).read_text())
    sys.stdout.write(table(doc))
    sys.stdout.write(format_targets(doc.get("targets") or targets(doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
