"""The benchmark harness (benchmarks/) and `convdsl bench`, on a CPU.

The harness's CPU smoke mode runs a few cases end to end: the generated
kernels under the interpreter, the torch backend and the eager reference;
results checked against the reference, JSON written, table printed. Every
case's eager reference is checked against the torch backend at tiny sizes,
and a wrong reference must be reported as a mismatch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl.bench import with_input_dtype
from convdsl.cli import main as cli_main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import report  # (benchmarks/ is a folder of scripts, not a package)
import run as harness
import suite

TINY_NET = """
net Tiny(x: f32[N, 2, 8, 8]) {
    c = conv(x, 4, kernel=3, pad=1)
    return maxpool(relu(c), 2)
}
"""


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONVDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernels"))


def test_cpu_smoke_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    rc = harness.main(["--cpu-smoke", "--cases", "conv3x3_c64_56,maxpool3x3_s2_c64_112",
                       "--examples", "digits.cdsl:DigitsLeNet", "--directions", "fwd",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    assert doc["mode"] == "smoke" and "say nothing" in doc["note"]
    env = doc["environment"]
    for key in ("date", "torch", "triton", "device", "driver", "commit"):
        assert key in env
    names = {(j["name"], j["direction"]) for j in doc["jobs"]}
    assert names == {("conv3x3_c64_56", "fwd"), ("maxpool3x3_s2_c64_112", "fwd"),
                     ("digits.cdsl:DigitsLeNet", "fwd")}
    for job in doc["jobs"]:
        assert job["check"]["ok"], job
        assert job["ms"]["triton"] > 0 and job["ms"]["eager"] > 0, job
        assert not job["errors"] and not job["skipped"], job
        assert job["flops"] is not None and job["bytes"] > 0 and job["kernels"]
    layers = [j for j in doc["jobs"] if j["kind"] == "layer"]
    assert all(j["ms"]["convdsl_torch"] > 0 for j in layers)
    assert [t["target"] for t in doc["targets"]] == [t["target"] for t in report.targets(doc)]
    assert "conv3x3_c64_56" in printed and "xeager" in printed and "targets" in printed


def test_a_wrong_result_is_reported_as_a_mismatch(tmp_path, monkeypatch, capsys):
    case = suite.BY_NAME["maxpool3x3_s2_c64_112"]
    wrong = suite.LayerCase(**{**case.__dict__,
                               "reference": lambda x, p: case.reference(x, p) + 0.5})
    monkeypatch.setitem(suite.BY_NAME, case.name, wrong)
    out = tmp_path / "wrong.json"
    rc = harness.main(["--cpu-smoke", "--cases", case.name, "--examples", "none",
                       "--directions", "fwd", "--out", str(out)])
    assert rc == 1
    (job,) = json.loads(out.read_text())["jobs"]
    assert not job["check"]["ok"] and job["check"]["relative_error"] > 0.1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.parametrize("case", suite.CASES, ids=lambda c: c.name)
def test_each_case_reference_matches_the_torch_backend(case):
    """Independent eager implementations (unfold + einsum, dense cuDNN for separable
    kernels, ...) against convdsl's torch backend, at tiny sizes; both dtypes compile."""
    s = case.smoke
    net = convdsl.compile(case.net("f32", s), backend="torch")
    for name, p in net.named_parameters():  # biases start at zero: make them count
        if name.endswith("bias"):
            torch.nn.init.uniform_(p.data, -0.5, 0.5)
    x = torch.randn(s["N"], s["C"], s["H"], s["W"], generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in net.state_dict().items()}
    torch.testing.assert_close(net(x), case.reference(x, params), rtol=1e-4, atol=1e-5)
    assert case.group in suite.GROUPS
    convdsl.compile(case.net("bf16", case.sizes), backend="torch")  # the GPU sizes check


def test_jobs_run_in_priority_order_and_max_autotune_joins_its_row():
    args = harness.parse_args(["--cases", "conv3x3_c64_56,avgpool2", "--examples",
                               "lenet5.cdsl:LeNet5"])
    jobs = harness.build_jobs(args, smoke=False)
    assert [j.priority for j in jobs] == sorted(j.priority for j in jobs)
    first = jobs[0]
    assert (first.name, first.dtype, first.backward) == ("conv3x3_c64_56", "bf16", False)
    assert first.contenders == ("triton", "eager", "compile")
    autotuned = [j for j in jobs if j.contenders == ("max_autotune",)]
    assert [(j.name, j.dtype, j.backward) for j in autotuned] == [("conv3x3_c64_56", "bf16",
                                                                    False)]
    assert autotuned[0].key == first.key  # merged into one row of the results
    nets = [j for j in jobs if j.kind == "net"]
    assert {(j.dtype, j.backward) for j in nets} == {("tf32", True), ("tf32", False),
                                                     ("bf16", True), ("f32", True)}
    pool = [j for j in jobs if j.name.startswith("avgpool2")]
    assert {j.dtype for j in pool} == {"bf16", "f32"}  # no TF32 without a matrix product


def test_targets_from_measured_ratios():
    def job(name, group, ms, dtype="bf16", direction="fwd", kind="layer", **extra):
        return {"name": name, "group": group, "dtype": dtype, "direction": direction,
                "kind": kind, "ms": ms, **extra}

    doc = {"copy_bandwidth_gbs": 3000.0, "jobs": [
        job("conv_a", "conv", {"triton": 1.0, "eager": 2.0}),
        job("conv_b", "conv", {"triton": 2.0, "eager": 1.0}),
        job("block", "fused_block", {"triton": 1.0, "eager": 1.2, "max_autotune": 1.5}),
        job("pool", "pool", {"triton": 1.0}, bytes=2.7e9),
        job("net", "example", {"triton": 2.0, "eager": 3.0}, dtype="tf32", direction="fwd+bwd",
            kind="net"),
    ]}
    found = {t["target"].split(" (")[0]: t for t in report.targets(doc)}
    conv = found["plain conv forward vs cuDNN"]
    assert conv["value"] == pytest.approx(1.0) and conv["met"]
    block = found["conv+bias+relu+maxpool fused vs eager"]
    assert block["value"] == pytest.approx(1.2) and not block["met"]
    assert "1.25x short" in block["shortfall"]
    assert found["conv+bias+relu+maxpool fused vs max_autotune"]["met"]
    pool = found["bandwidth-bound kernels vs the device's copy bandwidth"]
    assert pool["value"] == pytest.approx(0.9) and pool["met"]
    assert found["local vs unfold + einsum"]["value"] is None
    assert found["example nets forward+backward vs eager"]["value"] == pytest.approx(1.5)
    assert "conv_a" in report.table({**doc, "jobs": [dict(j, errors={}, skipped=[], check={})
                                                     for j in doc["jobs"]]})


def test_with_input_dtype_redeclares_only_the_chosen_nets_f32_inputs():
    text = ("net A(x: f32[N, 3], y: f32[N, 3]) { return x + y }\n"
            "net B(z: f32[N, 3]) { return relu(z) }\n")
    changed = with_input_dtype(text, "t.cdsl", "A", "bf16")
    assert changed.splitlines() == ["net A(x: bf16[N, 3], y: bf16[N, 3]) { return x + y }",
                                    "net B(z: f32[N, 3]) { return relu(z) }"]
    assert with_input_dtype(text, "t.cdsl", "A", "f32") == text


def test_convdsl_bench_on_cpu_warns_and_reports_ratios(tmp_path, capsys):
    path = tmp_path / "tiny.cdsl"
    path.write_text(TINY_NET)
    rc = cli_main(["bench", str(path), "--shape", "N=1", "--repeat", "1", "--dtype", "bf16",
                   "--backward"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "mean nothing for a GPU" in out.err
    assert "net Tiny: forward + backward, bf16, N=1 on cpu" in out.out
    rows = {line.split()[0]: line for line in out.out.splitlines()[2:]}
    assert set(rows) == {"triton", "eager", "compile"}
    assert "failed" not in out.out and ("faster" in rows["eager"] or "slower" in rows["eager"])
    assert "skipped" in rows["compile"]


def test_convdsl_bench_usage_errors(tmp_path, capsys):
    path = tmp_path / "tiny.cdsl"
    path.write_text(TINY_NET)
    assert cli_main(["bench", str(path), "--shape", "N=1,Q=2"]) == 1
    assert "--shape names Q" in capsys.readouterr().err
    assert cli_main(["bench", str(path)]) == 1
    assert "needs size N" in capsys.readouterr().err
    assert cli_main(["bench", str(tmp_path / "missing.cdsl"), "--shape", "N=1"]) == 1


def test_run_gpu_script_parses():
    script = BENCHMARKS / "run_gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert "benchmarks/run.py" in script.read_text()


@pytest.mark.slow
def test_warm_up_workers_run_their_shards(tmp_path):
    """The parallel untimed pass a GPU run starts with (here in smoke mode)."""
    args = harness.parse_args(["--cpu-smoke", "--cases", "maxpool3x3,avgpool2", "--examples",
                               "none", "--directions", "fwd", "--warm-budget", "600"])
    found = harness.warm_up(args, 2)
    assert found["workers"] == 2 and found["failed_workers"] == []


@pytest.mark.slow
def test_torch_compile_contender_on_cpu(tmp_path):
    out = tmp_path / "compiled.json"
    rc = harness.main(["--cpu-smoke", "--cases", "avgpool2", "--examples", "none",
                       "--directions", "fwd", "--contenders", "triton,eager,compile",
                       "--out", str(out)])
    assert rc == 0
    (job,) = json.loads(out.read_text())["jobs"]
    assert job["ms"]["compile"] > 0 and not job["errors"]
