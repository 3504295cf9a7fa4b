"""Worker processes for the kernel-cache tests (multiprocessing, spawn context).

Kept apart from the test module so a child imports only what it needs: the
loader alone (with TRITON_INTERPRET set, that does not import torch), or the
whole compiler for the end-to-end variant.
"""
from __future__ import annotations

import os


def load_sources(cache: str, sources: list[tuple[str, str]], barrier, rounds: int) -> list[str]:
    """Load every (source, kernel name) `rounds` times, all workers starting at
    once; return the kernel names found (their modules ran)."""
    os.environ["CONVDSL_CACHE_DIR"] = cache
    os.environ["TRITON_INTERPRET"] = "1"
    from convdsl.triton import loader

    barrier.wait()
    found = []
    for _ in range(rounds):
        loader._MODULES.clear()  # load from the shared directory every round
        for source, name in sources:
            found.append(loader.load_kernel(source, name).__name__)
    return found


def compile_and_run(cache: str, source: str, state: dict, x, barrier):
    """The same net compiled on the triton backend in several processes at once."""
    os.environ["CONVDSL_CACHE_DIR"] = cache
    import convdsl

    net = convdsl.compile(source, backend="triton")
    net.load_state_dict(state)
    barrier.wait()
    return net(x).detach()
