"""What a fuzz case must do: compile to a net or fail with a ConvDSLError, and,
when it compiles, run (forward and backward) or fail with a ConvDSLError.

Any other exception is a compiler bug; `Outcome` says which of these happened
so the fuzz tests can count them for docs/reliability.md.
"""
from __future__ import annotations

import contextlib
import io
import random
import re
import warnings
from dataclasses import dataclass

import torch

import convdsl
from convdsl.checks import TORCH_DTYPES
from convdsl.cli import main as cli_main

# Inputs larger than this are not run (the generator may declare 10^12 dims).
MAX_RUN_ELEMENTS = 20_000
_NET_NAME = re.compile(r"^\s*net\s+([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


@dataclass
class Outcome:
    stage: str  # "compile-error", "run-error", "ran", "too-big"
    net: object = None


def net_names(text: str) -> list[str]:
    return _NET_NAME.findall(text)


def compile_or_error(text: str, backend: str = "torch") -> Outcome:
    """Compile the last net of `text`; a ConvDSLError is a fine outcome."""
    names = net_names(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            net = convdsl.compile(text, backend=backend, net=names[-1] if len(names) > 1 else None)
        except convdsl.ConvDSLError as err:
            str(err)  # rendering the caret display must not fail either
            return Outcome("compile-error")
    return Outcome("compiled", net)


def random_inputs(net, seed: int = 0, max_elements: int = MAX_RUN_ELEMENTS):
    """Tensors matching the net's declared inputs, every size symbol bound to
    a small value (the same one wherever it appears); None when too big."""
    rng = random.Random(seed)
    graph = net._graph
    sizes = {name: rng.randint(1, 9) for name in sorted(graph.symbols)}
    inputs = []
    for node_id in graph.inputs:
        declared = graph.node(node_id).types[0]
        shape = [int(d) if d.is_Integer else sizes[str(d)] for d in declared.shape]
        numel = 1
        for s in shape:
            numel *= s
        if numel > max_elements:
            return None
        gen = torch.Generator().manual_seed(seed)
        inputs.append(torch.randn(shape, generator=gen).to(TORCH_DTYPES[declared.dtype]))
    return inputs


def run_or_error(net, seed: int = 0, backward: bool = True) -> Outcome:
    """Forward (and backward through every output) or a ConvDSLError."""
    if net._kmeans_pending:
        with contextlib.suppress(convdsl.ConvDSLError):
            net(*([torch.zeros(1)] * len(net.input_names)))
        return Outcome("run-error", net)
    inputs = random_inputs(net, seed)
    if inputs is None:
        return Outcome("too-big", net)
    try:
        out = net(*inputs)
    except convdsl.ConvDSLError as err:
        str(err)
        return Outcome("run-error", net)
    outs = out if isinstance(out, tuple) else (out,)
    for y in outs:
        assert isinstance(y, torch.Tensor) and y.dtype in (torch.float32, torch.float16,
                                                           torch.bfloat16)
    if backward:
        loss = sum(y.float().sum() for y in outs if y.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    return Outcome("ran", net)


def check_cli(text: str, tmp_dir, args=("check",)) -> int:
    """Run the CLI on `text` written to a file; return its exit code (0 or 1)."""
    path = tmp_dir / "fuzz.cdsl"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main([args[0], str(path), *args[1:]])
        except SystemExit as exc:  # argparse refusing arguments
            code = exc.code
    assert code in (0, 1), f"convdsl {args[0]} exited {code}:\n{err.getvalue()}"
    return code
