"""Every kernel the examples produce (forward, training-forward and backward)
compiles ahead of time for sm_80 and sm_90, without spills.

All examples give ~800 distinct kernels (~13 minutes a target on two cores),
so the default run compiles those of examples/lenet5.cdsl (four nets, every
common family) and `-m slow` compiles the rest."""
import functools
import warnings
from pathlib import Path

import pytest

import convdsl
from convdsl.compiler import load_program
from convdsl.triton.aot import compile_many, plan_jobs, resource_usage

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.cdsl"))


@functools.lru_cache(maxsize=2)
def example_jobs(paths: tuple = tuple(EXAMPLES)) -> list[dict]:
    """One job per distinct kernel across the example nets in `paths`."""
    jobs, seen = [], set()
    for path in paths:
        for name in load_program(path).nets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = convdsl.compile(path, net=name, backend="triton")
            for program in net._program.programs(net):
                for plan in program.plans:
                    if not plan.source or plan.source in seen:
                        continue
                    seen.add(plan.source)
                    for job in plan_jobs(plan, program.graph):
                        jobs.append({**job, "where": f"{path.name}:{name}:{plan.direction}"})
    return jobs


LENET = tuple(p for p in EXAMPLES if p.name == "lenet5.cdsl")


def test_examples_produce_forward_and_backward_kernels():
    directions = {job["where"].rsplit(":", 1)[1] for job in example_jobs(LENET)}
    assert directions == {"forward", "backward"}
    assert len(example_jobs(LENET)) > 20


@pytest.mark.parametrize("paths", [
    pytest.param(LENET, id="lenet5"),
    pytest.param(tuple(EXAMPLES), id="all-examples", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("target,capability", [("sm_90", 90), ("sm_80", 80)])
def test_every_example_kernel_compiles_without_spills(paths, target, capability, tmp_path):
    jobs = example_jobs(paths)
    results = compile_many([{k: v for k, v in j.items() if k != "where"} for j in jobs],
                           capability)
    problems = []
    for job, result in zip(jobs, results):
        registers, spills = resource_usage(result["cubin"], job["name"], tmp_path)
        if registers is None or spills:
            problems.append(f"{job['where']} {job['name']}: registers={registers} spills={spills}")
    assert not problems, "\n".join(problems)
