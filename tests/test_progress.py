"""Progress bars (convdsl/progress.py) for k-means fitting and ahead-of-time
compiles: shown on a terminal, silent in pipes and logs, and never in the way
of a command's own output."""
import io

import pytest
import torch

import convdsl
from convdsl import progress
from convdsl.triton.aot import compile_program

KM = """
net KM(x: f32[N, 1, 12, 12]) {
    f = conv(x, 4, kernel=3, stride=2, init=kmeans, trainable=false)
    return dense(flatten(f), 3)
}
"""

TINY = "net T(x: f32[N, 3, H, W]) {\n  return relu(x) * 2\n}"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what was written to it."""

    def isatty(self):
        return True


def as_terminal(monkeypatch) -> Terminal:
    """Make stderr a terminal. Call it in the test body: pytest's capture puts its
    own stderr back between a fixture's setup and the test."""
    stream = Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv(progress.ENV, raising=False)
    return stream


def data(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_wanted_follows_terminal_and_environment(monkeypatch):
    as_terminal(monkeypatch)
    assert progress.wanted() is True
    monkeypatch.setenv(progress.ENV, "0")
    assert progress.wanted() is False
    assert progress.wanted(True) is True  # an explicit request wins
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a log file
    monkeypatch.delenv(progress.ENV)
    assert progress.wanted() is False
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.wanted() is True
    assert progress.wanted(False) is False


def test_quiet_bar_has_the_bar_interface(monkeypatch):
    monkeypatch.setenv(progress.ENV, "off")
    with progress.bar(3, "nothing") as shown:
        shown.update(1)
    assert type(shown).__name__ == "_Quiet"


def test_fit_features_is_silent_without_a_terminal(capfd):
    net = convdsl.compile(KM, backend="torch")
    net.fit_features(data((4, 1, 12, 12)))
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert torch.isfinite(net(data((2, 1, 12, 12)))).all()


def test_fit_features_shows_a_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    terminal = as_terminal(monkeypatch)
    net = convdsl.compile(KM, backend="torch")
    net.fit_features(data((4, 1, 12, 12)))
    assert "kmeans f" in terminal.getvalue()


def test_fit_features_bar_can_be_turned_off(monkeypatch):
    terminal = as_terminal(monkeypatch)
    monkeypatch.setenv(progress.ENV, "0")
    net = convdsl.compile(KM, backend="torch")
    net.fit_features(data((4, 1, 12, 12)))
    net2 = convdsl.compile(KM, backend="torch")
    monkeypatch.delenv(progress.ENV)
    net2.fit_features(data((4, 1, 12, 12)), progress=False)
    assert terminal.getvalue() == ""
    # The bar does not change what is learned.
    assert torch.equal(net.state_dict()["f.weight"], net2.state_dict()["f.weight"])


def test_aot_compile_is_silent_without_a_terminal(capfd):
    net = convdsl.compile(TINY, backend="triton")
    reports = compile_program(net._program.inference, "sm_90", None, {"N": 2, "H": 8, "W": 8})
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert len(reports) == 1 and reports[0].registers and reports[0].spills == 0


@pytest.mark.slow
def test_aot_compile_counts_kernels_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    net = convdsl.compile(TINY, backend="triton")
    stream = as_terminal(monkeypatch)
    reports = compile_program(net._program.inference, "sm_90", None, {"N": 2, "H": 8, "W": 8})
    text = stream.getvalue()
    assert "T: compiling for sm_90" in text and "1/1" in text
    assert "convdsl-aot-done" not in text  # the worker's progress lines are consumed
    assert len(reports) == 1 and reports[0].registers and reports[0].spills == 0
