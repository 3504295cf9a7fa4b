"""The triton backend: IR nodes lowered to generated Triton kernels.

    lowering.py   IR graph → a list of KernelPlans (elementwise chains fused)
    codegen.py    Jinja templates in kernels/ → kernel source (deterministic)
    loader.py     kernel source → a callable kernel (compiled, or interpreted on CPU)
    runtime.py    runs the plans inside torch.autograd
    aot.py        ahead-of-time compilation for a GPU target, with a resource report
    families/     one module per kernel family: what to render, how to launch

Triton decides once, when `triton.language` is first imported, whether its
own library functions (tl.sum, tl.zeros, ...) are interpreted or compiled. So
on a machine without a GPU this package turns the interpreter on before
Triton is imported (unless TRITON_INTERPRET is already set); ahead-of-time
compilation then runs in a worker process that imports Triton in compiled mode.
"""
import os
import sys


def _choose_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        gpu = False
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"


_choose_interpreter()
