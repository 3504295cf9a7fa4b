"""One benchmark job: a layer case or an example net, at one dtype, forward
or forward + backward, timed every way its contenders name.

Contenders:
    triton         convdsl's generated kernels
    convdsl_torch  convdsl's torch backend (a second opinion; the CPU smoke run)
    eager          PyTorch eager: the case's own reference (cuDNN), or for an example
                   net its torch-backend lowering
    compile        torch.compile of the eager contender
    max_autotune   torch.compile(mode="max-autotune") of it

Every contender runs on the same input and the same parameter values; the
triton contender's output is checked against the eager one."""
from __future__ import annotations

import math
import time
import traceback
import warnings
from dataclasses import dataclass, field

import torch
from common import compile_quiet

from convdsl.bench import (
    precision,
    random_inputs,
    skip_feature_fitting,
    step_function,
    time_call,
    with_input_dtype,
)

ACTIVATION = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
DECLARED = {"f32": "f32", "tf32": "f32", "bf16": "bf16"}
# Largest error, relative to the reference output's largest magnitude, that still
# counts as the same result (fp32 accumulation in every case).
TOLERANCE = {"f32": 1e-3, "tf32": 2e-2, "bf16": 4e-2}


@dataclass
class Job:
    kind: str  # "layer" or "net"
    name: str  # case name, or "file.cdsl:Net"
    dtype: str
    backward: bool
    contenders: tuple[str, ...]
    priority: float
    group: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}|{self.dtype}|{'fwd+bwd' if self.backward else 'fwd'}"


@dataclass
class Outcome:
    """What one job measured: milliseconds per contender, or why not."""

    job: Job
    sizes: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    check: dict = field(default_factory=dict)
    flops: int | None = None
    bytes: int | None = None
    kernels: list = field(default_factory=list)  # (family, name) of each forward kernel
    seconds: float = 0.0

    def as_json(self) -> dict:
        j = self.job
        return {"key": j.key, "kind": j.kind, "name": j.name, "group": j.group, "dtype": j.dtype,
                "direction": "fwd+bwd" if j.backward else "fwd", "priority": j.priority,
                "sizes": self.sizes, "ms": self.ms, "errors": self.errors,
                "skipped": self.skipped, "check": self.check, "flops": self.flops,
                "bytes": self.bytes, "kernels": self.kernels, "seconds": round(self.seconds, 2)}


class Reference(torch.nn.Module):
    """A case's eager PyTorch function over its own copy of the parameters, held
    in the activation dtype (as a user's model.to(dtype) holds them)."""

    def __init__(self, fn, params: dict, dtype: torch.dtype):
        super().__init__()
        self.fn = fn
        self.names = list(params)
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in params.values()])

    def forward(self, x):
        return self.fn(x, dict(zip(self.names, self.params)))


def randomize_biases(net) -> None:
    """Initial biases are zeros, which would hide a bias bug from the check."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=generator) * 0.2 - 0.1)


def plan_cost(net, sizes: dict) -> tuple[int, int, list]:
    """Cost-model FLOPs and bytes of the net's forward kernels at `sizes`, and the
    kernels themselves."""
    from convdsl.ir.types import symbol
    from convdsl.triton.families import family

    program = net._program.inference
    env = {symbol(k): v for k, v in sizes.items()}
    flops = nbytes = 0
    for plan in program.plans:
        if plan.source:
            f, b = family(plan.family).cost(plan, program.graph, env)
            flops, nbytes = flops + int(f), nbytes + int(b)
    return flops, nbytes, [[p.family, p.name] for p in program.plans]


def _relative_error(got, want) -> float:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return math.inf
    scale = want.abs().max().clamp_min(1e-6)
    return float((got - want).abs().max() / scale)


def _outputs(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


class Runner:
    """Builds a job's contenders and times them, within the run's deadline."""

    def __init__(self, device: torch.device, deadline: float, repeat: int, smoke: bool,
                 warm_only: bool = False):
        self.device, self.deadline, self.repeat = device, deadline, repeat
        self.smoke, self.warm_only = smoke, warm_only

    def left(self) -> float:
        return self.deadline - time.monotonic()

    # -- building ------------------------------------------------------------------------------
    def layer(self, job: Job, case):
        sizes = case.smoke if self.smoke else case.sizes
        text = case.net(DECLARED[job.dtype], sizes)
        triton_net = compile_quiet(text, backend="triton").to(self.device)
        randomize_biases(triton_net)
        params = {k: v.detach() for k, v in triton_net.state_dict().items()}
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(sizes["N"], sizes["C"], sizes["H"], sizes["W"], generator=generator)
        x = x.to(self.device, ACTIVATION[job.dtype])
        dtype = ACTIVATION[job.dtype]

        def make(mode):
            if mode == "triton":
                return triton_net
            if mode == "convdsl_torch":
                net = compile_quiet(text, backend="torch").to(self.device)
                net.load_state_dict(triton_net.state_dict())
                return net
            eager = Reference(case.reference, params, dtype).to(self.device)
            if mode == "eager":
                return eager
            return _compiled(eager, mode)

        return {"N": sizes["N"]}, {k: v for k, v in sizes.items()}, triton_net, [x], make

    def example(self, job: Job, path, net_name: str, example_sizes):
        text = with_input_dtype(path.read_text(), str(path), net_name, DECLARED[job.dtype])
        torch_net = compile_quiet(text, net=net_name, backend="torch").to(self.device)
        skip_feature_fitting(torch_net)
        sizes = example_sizes(path.name, torch_net._graph.symbols, self.smoke)
        inputs = random_inputs(torch_net._graph, sizes, self.device)
        triton_net = compile_quiet(text, net=net_name, backend="triton").to(self.device)
        skip_feature_fitting(triton_net)
        triton_net.load_state_dict(torch_net.state_dict())

        def make(mode):
            if mode == "triton":
                return triton_net
            if mode in ("eager", "convdsl_torch"):
                return torch_net
            return _compiled(torch_net, mode)

        return sizes, sizes, triton_net, inputs, make

    # -- running -------------------------------------------------------------------------------
    def run(self, job: Job, build) -> Outcome:
        started = time.monotonic()
        outcome = Outcome(job)
        precision(job.dtype)
        try:
            cost_sizes, outcome.sizes, triton_net, inputs, make = build()
            outcome.flops, outcome.bytes, outcome.kernels = plan_cost(triton_net, cost_sizes)
        except Exception as err:  # noqa: BLE001  (a case that does not build is a result too)
            outcome.errors["build"] = _error(err)
            outcome.seconds = time.monotonic() - started
            return outcome
        reference_out = None
        for mode in job.contenders:
            if self.left() <= 0:
                outcome.skipped.append(mode)
                continue
            try:
                module = make(mode)
                if mode == "eager" and not self.warm_only:
                    reference_out = _outputs(module, inputs)
                step, grads = step_function(module, [x.detach().clone() for x in inputs],
                                            job.backward)
                if self.warm_only:  # compile and tune only: the timed run comes later
                    step()
                    continue
                outcome.ms[mode] = round(time_call(step, self.device, grads, self.repeat), 6)
            except Exception as err:  # noqa: BLE001  (one contender failing is recorded)
                outcome.errors[mode] = _error(err)
        if "triton" in job.contenders and "triton" not in outcome.errors and \
                reference_out is not None and "triton" not in outcome.skipped:
            try:
                got = _outputs(triton_net, inputs)
                error = max(_relative_error(g, w) for g, w in zip(got, reference_out))
                outcome.check = {"relative_error": error, "tolerance": TOLERANCE[job.dtype],
                                 "ok": error <= TOLERANCE[job.dtype]}
            except Exception as err:  # noqa: BLE001
                outcome.check = {"ok": False, "error": _error(err)}
        outcome.seconds = time.monotonic() - started
        return outcome


def _compiled(module, mode: str):
    """torch.compile of `module`, from a clean slate: every job's Reference shares one
    forward code object, and past Dynamo's recompile limit it would quietly run eager."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.compile(module, mode="max-autotune" if mode == "max_autotune" else None)


def _error(err: BaseException) -> str:
    last = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
    where = f" ({last[0].filename.rsplit('/', 1)[-1]}:{last[0].lineno})" if last else ""
    return f"{type(err).__name__}: {str(err)[:400]}{where}"
