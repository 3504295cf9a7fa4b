"""Ahead-of-time compilation for a GPU that need not be present.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` gives PTX
and a cubin; Triton's bundled `cuobjdump` reads registers, local memory
(spills) and shared memory from the cubin."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass
class KernelReport:
    name: str
    direction: str
    family: str
    registers: int | None
    spills: int | None  # bytes of stack + local memory per thread (0 = no spills)
    shared_bytes: int
    flops: int
    bytes: int


def parse_target(text: str) -> int:
    if text not in TARGETS:
        raise ValueError(f"unknown target '{text}'; choose one of {', '.join(TARGETS)}")
    return TARGETS[text]


def _cuobjdump() -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def resource_usage(cubin: bytes, name: str, workdir: Path) -> tuple[int | None, int | None]:
    """(registers, local-memory bytes) of kernel `name` in a cubin."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    path = workdir / f"{name}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=False).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+).*?LOCAL:(\d+)", out, re.S)
    if not match:
        return None, None
    # ptxas spills to the stack frame or to local memory; either counts.
    return int(match.group(1)), int(match.group(2)) + int(match.group(3))


def compile_kernel(source: str, name: str, signature: dict, constexprs: dict, capability: int,
                   options: dict | None = None, attrs: list | None = None):
    """One kernel compiled for `sm_<capability>` in this process (Triton in compiled
    mode); `options` are launch options such as num_warps and num_stages, `attrs`
    the JIT's argument facts as [[path], [[name, value], ...]] pairs (aot_launch.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .loader import load_kernel

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    fn = load_kernel(source, name, interpret=False)
    facts = {tuple(path): value for path, value in attrs or ()}
    return triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs,
                                    attrs=facts),
                          target=GPUTarget("cuda", capability, 32), options=options or None)


def compile_many(jobs: list[dict], capability: int, progress: bool | None = None,
                 desc: str = "") -> list[dict]:
    """Compile kernels: {"source", "name", "signature", "constexprs"} → {"ptx", "cubin",
    "shared"}. In a worker process when this one interprets Triton's library. A progress
    bar counts the kernels (convdsl.progress: on a terminal with tqdm, unless `progress`
    says otherwise)."""
    from ..progress import bar
    from .loader import library_interpreted

    with bar(len(jobs), desc or f"compiling for sm_{capability}", progress) as shown:
        if not library_interpreted():
            results = []
            for job in jobs:
                compiled = compile_kernel(job["source"], job["name"], job["signature"],
                                          job["constexprs"], capability, job.get("options"),
                                          job.get("attrs"))
                results.append({"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"],
                                "shared": int(compiled.metadata.shared)})
                shown.update(1)
            return results
        request = json.dumps({"capability": capability, "jobs": jobs})
        returncode, stdout, stderr = _run_worker(request, shown.update)
    if returncode != 0:
        raise RuntimeError(f"ahead-of-time compilation failed:\n{stderr[-4000:]}")
    results = json.loads(stdout)
    for r in results:
        r["cubin"] = base64.b64decode(r["cubin"])
    return results


def _run_worker(request: str, advance) -> tuple[int, str, str]:
    """Run aot_worker on `request`: (exit status, stdout, stderr without its progress lines).
    The request goes in and stdout (megabytes of PTX) comes out on threads while stderr is
    read line by line, so no pipe can fill up and stall both sides; each line the worker
    prints per compiled kernel calls advance(1)."""
    import threading

    from .aot_worker import PROGRESS

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    worker = subprocess.Popen([sys.executable, "-m", "convdsl.triton.aot_worker"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)

    def feed():
        try:
            worker.stdin.write(request)
            worker.stdin.close()
        except BrokenPipeError:  # it died at start-up: its stderr says why
            pass

    chunks: list[str] = []
    threads = [threading.Thread(target=feed, daemon=True),
               threading.Thread(target=lambda: chunks.append(worker.stdout.read()), daemon=True)]
    for thread in threads:
        thread.start()
    errors = []
    for line in worker.stderr:
        if line.startswith(PROGRESS):
            advance(1)
        else:
            errors.append(line)
    for thread in threads:
        thread.join()
    return worker.wait(), "".join(chunks), "".join(errors)


def compile_program(program, target: str, outdir: Path | None, env: dict,
                    progress: bool | None = None) -> list[KernelReport]:
    """Compile every kernel of a TritonProgram (or of a TritonNet's forward and
    backward programs); write PTX and cubin to `outdir`."""
    if hasattr(program, "inference"):  # a TritonNet: its programs, each kernel once
        programs = [program.inference, *(
            [program._training] if program._training is not None else []),
            *program._backward.values()]
        reports, seen = [], set()
        for p in programs:
            for report in compile_program(p, target, outdir, env, progress):
                if report.name not in seen:
                    seen.add(report.name)
                    reports.append(report)
        return reports
    from ..ir.types import symbol
    from .families import family

    capability = parse_target(target)
    sym_env = {symbol(k): v for k, v in env.items()}
    plans = [p for p in program.plans if p.source]
    jobs, owners = [], []
    for plan in plans:
        for job in plan_jobs(plan, program.graph):
            jobs.append(job)
            owners.append(plan)
    results = compile_many(jobs, capability, progress,
                           f"{program.graph.name}: compiling for {target}")
    workdir = outdir if outdir is not None else Path(_tmpdir())
    reports = []
    for plan, job, result in zip(owners, jobs, results):
        name = job["name"]
        if outdir is not None:
            (outdir / f"{name}.ptx").write_text(result["ptx"])
            (outdir / f"{name}.cubin").write_bytes(result["cubin"])
        registers, spills = resource_usage(result["cubin"], name, workdir)
        # The plan's cost goes to its main kernel; helper kernels (a split-K sum) report 0.
        flops, nbytes = family(plan.family).cost(plan, program.graph, sym_env) \
            if name == plan.name else (0, 0)
        reports.append(KernelReport(name, plan.direction, plan.family, registers, spills,
                                    result["shared"], int(flops), int(nbytes)))
    return reports


def plan_jobs(plan, graph) -> list[dict]:
    """The compile jobs of one plan: its kernel, and any helper kernels in the
    same module (a family lists those with `aot_extra`)."""
    from .families import family

    fam = family(plan.family)
    spec = fam.aot(plan, graph)
    jobs = [{"source": plan.source, "name": plan.name, "signature": spec[0],
             "constexprs": spec[1], "options": spec[2] if len(spec) > 2 else {}}]
    extra = getattr(fam, "aot_extra", None)
    for item in (extra(plan, graph) if extra else []):
        name, signature, constexprs = item[:3]
        jobs.append({"source": plan.source, "name": name, "signature": signature,
                     "constexprs": constexprs, "options": item[3] if len(item) > 3 else {}})
    return jobs


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="convdsl-aot-")


def report_json(target: str, reports: list[KernelReport], env: dict) -> dict:
    return {"target": target, "sizes": dict(sorted(env.items())),
            "kernels": [asdict(r) for r in reports]}
