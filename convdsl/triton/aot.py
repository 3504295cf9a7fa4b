"""Ahead-of-time compilation for a GPU that need not be present.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` gives PTX
and a cubin; Triton's bundled `cuobjdump` reads registers, local memory
(spills) and shared memory from the cubin."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


@dataclass
class KernelReport:
    name: str
    direction: str
    family: str
    registers: int | None
    spills: int | None  # bytes of local memory per thread (0 = no spills)
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
    match = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out, re.S)
    if not match:
        return None, None
    return int(match.group(1)), int(match.group(2))


def compile_kernel(source: str, name: str, signature: dict, constexprs: dict, capability: int):
    """One kernel compiled for `sm_<capability>`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .loader import load_kernel

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    fn = load_kernel(source, name, interpret=False)
    return triton.compile(ASTSource(fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", capability, 32))


def compile_program(program, target: str, outdir: Path | None, env: dict) -> list[KernelReport]:
    """Compile every kernel of a TritonProgram (or of a TritonNet's forward and
    backward programs); write PTX and cubin to `outdir`."""
    if hasattr(program, "inference"):
        programs = [program.inference, *program._backward.values()]
        return [r for p in programs for r in compile_program(p, target, outdir, env)]
    from .families import family

    from ..ir.types import symbol

    capability = parse_target(target)
    sym_env = {symbol(k): v for k, v in env.items()}
    reports = []
    workdir = outdir if outdir is not None else Path(_tmpdir())
    for plan in program.plans:
        if not plan.source:
            continue
        fam = family(plan.family)
        signature, constexprs = fam.aot(plan, program.graph)
        compiled = compile_kernel(plan.source, plan.name, signature, constexprs, capability)
        if outdir is not None:
            (outdir / f"{plan.name}.ptx").write_text(compiled.asm["ptx"])
            (outdir / f"{plan.name}.cubin").write_bytes(compiled.asm["cubin"])
        registers, spills = resource_usage(compiled.asm["cubin"], plan.name, workdir)
        flops, nbytes = fam.cost(plan, program.graph, sym_env)
        reports.append(KernelReport(plan.name, plan.direction, plan.family, registers, spills,
                                    int(compiled.metadata.shared), int(flops), int(nbytes)))
    return reports


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="convdsl-aot-")


def report_json(target: str, reports: list[KernelReport], env: dict) -> dict:
    return {"target": target, "sizes": dict(sorted(env.items())),
            "kernels": [asdict(r) for r in reports]}
