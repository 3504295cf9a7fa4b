"""Determinism: the same .cdsl gives byte-identical IR dumps (every stage and
format) and kernel sources (forward, training and backward programs), within
a process and across processes with different PYTHONHASHSEED, so nothing
depends on set or dict order or on object addresses."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import convdsl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STAGES = ("parsed", "optimized", "backward")
FORMATS = ("text", "json", "dot")

# Tables, blocks, a shared block, ties, several outputs and symbolic sizes.
MIXED = """table T = [[0, 1], [1, 2], [2, 0], [0, 1, 2]]
block stage(x, c) {
    h = relu(conv(x, c, kernel=3, pad=same))
    return maxpool(h, 2)
}
shared block refine(x) {
    return x + relu(conv(x, 4, kernel=3, pad=same, name="smooth"))
}
net Mixed(img: f32[N, 3, H, W], aux: f32[N, 3, H, W]) {
    a = conv(img, 4, kernel=3, pad=same, connect=T)
    b = stage(aux, 4)
    a = refine(maxpool(a, 2) + b)
    a = refine(a)
    c, d = split(a, [1, 3])
    e = concat(softmax(d), c * 2, axis=1)
    up = deconv(e, 3, kernel=2, stride=2, size=(H, W))
    return dense(flatten(avgpool(e, output=2)), 5), up
}
"""


def artifacts(source: str | Path, net_name: str | None = None) -> dict[str, str]:
    """Every dump and kernel of one net: stage/format → text, kernel name → source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convdsl.compile(source, net=net_name, backend="triton")
    found = {f"ir/{stage}/{fmt}": net.ir(stage, fmt) for stage in STAGES for fmt in FORMATS}
    for index, program in enumerate(net._program.programs(net)):
        for plan in program.plans:
            found[f"kernel/{index}/{plan.name}"] = plan.source
    return found


def digests(found: dict[str, str]) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in found.items()}


def test_the_same_program_gives_identical_dumps_and_kernels_in_one_process():
    first, second = artifacts(MIXED), artifacts(MIXED)
    assert first == second
    assert sum(k.startswith("kernel/") for k in first) >= 20


# The child prints the digests of every artifact of each (file, net) it is given.
CHILD = """
import json, sys
sys.path.insert(0, {root!r})
from tests.reliability.test_determinism import artifacts, digests
jobs = json.loads(sys.argv[1])
print(json.dumps({{f"{{path}}:{{net}}": digests(artifacts(path, net)) for path, net in jobs}}))
"""


def digests_in_subprocesses(jobs: list[tuple[str, str | None]], seeds: list[str]) -> list[dict]:
    code = CHILD.format(root=str(ROOT))
    procs = []
    for seed in seeds:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(jobs)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=str(ROOT)))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def assert_all_equal(results: list[dict]) -> None:
    first = results[0]
    for other in results[1:]:
        assert other.keys() == first.keys()
        for job in first:
            differ = sorted(k for k in first[job] if first[job][k] != other[job].get(k))
            assert first[job].keys() == other[job].keys() and not differ, f"{job}: {differ}"


def test_dumps_and_kernels_do_not_depend_on_the_hash_seed(tmp_path):
    mixed = tmp_path / "mixed.cdsl"
    mixed.write_text(MIXED)
    assert_all_equal(digests_in_subprocesses([(str(mixed), "Mixed")], ["0", "4242"]))


@pytest.mark.slow
def test_every_example_is_deterministic_across_hash_seeds():
    jobs = []
    for path in sorted(EXAMPLES.glob("*.cdsl")):
        program = convdsl.compiler.load_program(path)
        jobs += [(str(path), name) for name in program.nets]
    assert_all_equal(digests_in_subprocesses(jobs, ["0", "1", "987654321"]))
