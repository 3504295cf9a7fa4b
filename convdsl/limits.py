"""The compiler's size limits, in one place (docs/reliability.md lists them).

A hostile or generated program may nest expressions or block calls thousands
deep, or declare a parameter tensor larger than any memory. Each limit turns
such a program into a ConvDSLError at its source line; below the limits the
compiler works, because the parser and the builder run with enough Python
stack for the deepest program the limits admit.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading

# Integer literals and constants: sizes and indices are int64 in PyTorch.
INT_MAX = 2**63 - 1
# Parse-tree levels one expression may nest: relu(relu(...)), ((x)), a + a + ...
MAX_NESTING = 500
# Block calls in progress at once: a block calling a block calling a block ...
MAX_BLOCK_DEPTH = 500
# Python frames the parser and builder may use per level of nesting (measured:
# about 3 per nested call in Lark's transformer, 6 per block call in the builder).
_FRAMES_PER_LEVEL = 12
_STACK_FRAMES = 2_000 + _FRAMES_PER_LEVEL * (MAX_NESTING + 2 * MAX_BLOCK_DEPTH)

# Parameters are allocated when the CompiledNet is made, so a net whose
# parameter tensors cannot be held is refused at compile time, before any
# allocation. 2^31 elements is 8 GiB of f32: beyond any net of the book.
DEFAULT_MAX_PARAMS = 2**31

# A Gabor bank (orientations x frequencies x phases) larger than this has more
# kernels than any layer has channels (output channel o uses entry o mod bank
# size), and would take long to draw.
MAX_GABOR_BANK = 65536

# Kernel, stride, dilation, window, padding, tile and size arguments: generated
# kernels do their index arithmetic in int32, and no real layer comes close.
MAX_EXTENT = 2**31 - 1

# A tensor a layer makes at run time (its output, or its padded input) may hold
# at most this many elements: 2^34 is 64 GiB of f32, so a larger one is almost
# surely a mistake (dilation=10^9 with pad=same) that would otherwise fail
# inside PyTorch's allocator, or exhaust the host's memory.
DEFAULT_MAX_TENSOR_ELEMENTS = 2**34


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else default


def max_param_elements() -> int:
    """The bound on a net's parameter elements: CONVDSL_MAX_PARAMS, or 2^31."""
    return _env_int("CONVDSL_MAX_PARAMS", DEFAULT_MAX_PARAMS)


def max_tensor_elements() -> int:
    """The bound on one run-time tensor: CONVDSL_MAX_TENSOR_ELEMENTS, or 2^34."""
    return _env_int("CONVDSL_MAX_TENSOR_ELEMENTS", DEFAULT_MAX_TENSOR_ELEMENTS)


_lock = threading.Lock()
_users = 0
_saved_limit = 0


@contextlib.contextmanager
def stack_room():
    """Raise Python's recursion limit enough for the deepest admitted program,
    and put it back when the last user (of any thread) is done."""
    global _users, _saved_limit
    with _lock:
        if _users == 0:
            _saved_limit = sys.getrecursionlimit()
        _users += 1
        if sys.getrecursionlimit() < _STACK_FRAMES:
            sys.setrecursionlimit(_STACK_FRAMES)
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setrecursionlimit(_saved_limit)
