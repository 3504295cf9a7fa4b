"""Compiles of the kernels as a GPU launch would specialize them (aot_launch.py):
launches recorded on host tensors, specialized as Triton's JIT does, compiled."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.triton.aot_launch import (
    compile_launches,
    distinct_jobs,
    record_net,
    specialize_value,
)
from convdsl.triton.families.conv import CONV_F32_TILES, CONV_TILES

CONV = "net C(x: {dtype}[N, 16, 12, 12]) {{\n    return relu(conv(x, 32, kernel=3, pad=1))\n}}\n"


def test_specialization_matches_tritons_jit():
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    aligned = torch.zeros(64)
    for value in (1, 16, 17, 48, -32, 2**31 - 1, 2**31, 2**33, aligned, aligned[1:],
                  torch.zeros(8, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.int8)):
        want = native(BaseBackend, value, False, True, True)
        assert specialize_value(value) == (want[0], want[1]), value


def test_a_recorded_training_step_takes_the_gpu_configs_and_runs_nothing():
    net = convdsl.compile(CONV.format(dtype="bf16"), backend="triton")
    launches = record_net(net, {"N": 4})
    conv = [launch for launch in launches if launch.name.startswith("k_conv_2d")]
    default = [launch for launch in conv if not launch.candidate]
    # every candidate once, each shrunk to the layer: 576 rows, 32 outputs, 16 inputs
    fitted = {tile.fit(4 * 12 * 12, 32, 16) for tile in CONV_TILES}
    assert len(default) == 1 and len(conv) == len(fitted) > 1
    first = CONV_TILES[0].fit(4 * 12 * 12, 32, 16)
    assert (default[0].kwargs["BLOCK_M"], default[0].kwargs["BLOCK_N"],
            default[0].kwargs["BLOCK_K"]) == (first.BLOCK_M, first.BLOCK_N, first.BLOCK_K) \
        == (64, 32, 16)
    assert default[0].kwargs["num_warps"] == first.num_warps
    assert default[0].kwargs["DOT_FP32"] is False  # a GPU multiplies bf16 on tensor cores
    assert any(launch.name.startswith("k_conv_dw") for launch in launches)  # the backward too
    assert not net._program.inference._kernels  # recorders are never cached as kernels

    # the net still computes afterwards
    x = torch.randn(2, 16, 12, 12).bfloat16()
    params = dict(net.named_parameters())
    want = F.relu(F.conv2d(x.float(), params["conv.weight"].bfloat16().float(),
                           params["conv.bias"], padding=1))
    torch.testing.assert_close(net(x).float(), want, rtol=2e-2, atol=2e-2)


def test_unit_strides_become_constants_and_sizes_carry_divisibility():
    net = convdsl.compile(CONV.format(dtype="f32"), backend="triton")
    jobs = distinct_jobs(record_net(net, {"N": 4}, training=False))
    job = next(j for j, default in jobs if j["name"].startswith("k_conv_2d") and default)
    assert job["signature"]["stride_xw"] == "constexpr" and job["constexprs"]["stride_xw"] == 1
    assert job["signature"]["c_out"] == "i32"  # 32 channels: divisible by 16
    names = list(job["signature"])
    facts = {names[path[0]] for path, _ in job["attrs"]}
    assert {"x_ptr", "w_ptr", "y_ptr", "c_out"} <= facts and "in_h" not in facts  # 12
    assert job["constexprs"]["BLOCK_K"] == 16  # CONV_F32_TILES[0] shrunk to 16 input channels
    assert CONV_F32_TILES[0].BLOCK_K > 16


def test_the_default_bf16_conv_compiles_for_sm90_on_tensor_cores_without_spills(tmp_path):
    net = convdsl.compile(CONV.format(dtype="bf16"), backend="triton")
    launches = [launch for launch in record_net(net, {"N": 8}, training=False)
                if not launch.candidate]
    (report,) = compile_launches(launches, "sm_90", tmp_path, progress=False)
    assert report.default and report.spills == 0 and report.registers <= 255
    assert report.features["wgmma"] > 0
    assert report.config["BLOCK_M"] == CONV_TILES[0].BLOCK_M and report.config["BLOCK_K"] == 16
    assert any(tmp_path.glob("*.ptx"))


def test_cli_as_launched_needs_a_target(tmp_path):
    src = tmp_path / "c.cdsl"
    src.write_text(CONV.format(dtype="f32"))
    done = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(src), "--as-launched",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "--as-launched needs --target" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_cli_as_launched_reports_every_candidate(tmp_path):
    src = tmp_path / "c.cdsl"
    src.write_text(CONV.format(dtype="bf16"))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "convdsl", "compile", str(src), "--target",
                           "sm_90", "--as-launched", "--shape", "N=8", "-o", str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / "report.json").read_text())
    conv = [k for k in doc["kernels"] if k["name"].startswith("k_conv_2d")]
    assert len(conv) == len({t.fit(8 * 12 * 12, 32, 16) for t in CONV_TILES})
    assert sum(k["default"] for k in conv) == 1
    assert all(k["spills"] == 0 for k in conv)
