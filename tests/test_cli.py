"""The convdsl command line: check, ir, run; exit codes 0/1/2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from convdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
LENET = str(ROOT / "examples" / "lenet5.cdsl")


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_reports_each_net(capsys):
    code, out, err = run_main(capsys, "check", LENET)
    assert code == 0
    assert "net LeNet5" in out and "parameters: 60,806" in out
    assert "image: f32[N, 1, 32, 32]" in out and "outputs:    f32[N, 10]" in out
    assert "net AnySize" in out and "image: f32[N, 3, H, W]" in out


def test_check_shows_trainable_count_when_frozen(capsys, tmp_path):
    path = tmp_path / "f.cdsl"
    path.write_text("net F(x: f32[N, 1, 6, 6]) {\n"
                    "  f = conv(x, 2, kernel=3, trainable=false)\n"
                    "  return dense(flatten(f), 3)\n}\n")
    code, out, _ = run_main(capsys, "check", str(path))
    assert code == 0 and "parameters: 119 (99 trainable)" in out


def test_check_error_exits_1_with_the_error_format(capsys, tmp_path):
    path = tmp_path / "bad.cdsl"
    path.write_text("net A(x: f32[N, 1, 8, 8]) {\n  return cnov(x)\n}\n")
    code, out, err = run_main(capsys, "check", str(path))
    assert code == 1 and out == ""
    assert err.startswith(f"{path}:2:10: error: unknown op 'cnov'")
    assert "Traceback" not in err


def test_ir_formats(capsys):
    code, out, _ = run_main(capsys, "ir", LENET, "--net", "LeNet5", "--stage", "parsed")
    assert code == 0 and out.startswith("net LeNet5(image: f32[N, 1, 32, 32]) {")
    code, out, _ = run_main(capsys, "ir", LENET, "--net", "LeNet5", "--format", "json")
    assert json.loads(out)["parameter_count"] == 60806
    code, out, _ = run_main(capsys, "ir", LENET, "--net", "LeNet5", "--format", "dot")
    assert out.startswith("digraph")


def test_ir_needs_a_net_when_there_are_several(capsys):
    code, _, err = run_main(capsys, "ir", LENET)
    assert code == 1 and "pick one with net=" in err


def test_run_prints_shapes_and_times(capsys):
    code, out, _ = run_main(capsys, "run", LENET, "--net", "AnySize", "--shape", "N=2,H=20,W=24",
                            "--repeat", "1")
    assert code == 0
    assert "input  image: [2, 3, 20, 24]" in out and "output 0: [2, 10]" in out and "ms" in out


@pytest.mark.parametrize("shape,words", [
    ("N=2", "needs size H"),
    ("N=2,H=x", "NAME=INT"),
    ("N=2,H=8,W=8,Q=3", "no input"),
    ("N=2,H=1,W=1", "larger than the padded input"),
])
def test_run_bad_shapes_exit_1(capsys, shape, words):
    code, _, err = run_main(capsys, "run", LENET, "--net", "AnySize", "--shape", shape)
    assert code == 1 and words in err, err


def test_bad_arguments_exit_1(capsys):
    with pytest.raises(SystemExit) as info:
        main(["ir", LENET, "--stage", "nonsense"])
    assert info.value.code == 1


def test_internal_errors_exit_2(capsys, monkeypatch):
    import convdsl.cli as cli

    def boom(args):
        raise RuntimeError("simulated bug")

    monkeypatch.setitem(cli.COMMANDS, "check", boom)
    code, _, err = run_main(capsys, "check", LENET)
    assert code == 2 and "internal error: RuntimeError: simulated bug" in err
    assert "Traceback" not in err


def test_python_dash_m_and_console_script():
    result = subprocess.run([sys.executable, "-m", "convdsl", "check", LENET],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "60,806" in result.stdout
