"""examples/train_digits.py at a tiny scale: every workflow's code path on the torch
backend, one on the triton backend (equal to torch), pictures and saved weights."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.kmeans import fit_kmeans_layers
from tests.test_pictures import decode_png

pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROGRAM = EXAMPLES / "digits.cdsl"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLES / "train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


train_digits = _load_script()
digits_data = sys.modules["digits_data"]  # the script put examples/ on sys.path


def _reference_accuracy(net_name: str, state: dict, x, y) -> float:
    net = convdsl.compile(PROGRAM, net=net_name, backend="torch")
    net.load_state_dict(state)
    with torch.no_grad():
        return (net(x).argmax(1) == y).double().mean().item()


def test_the_split_is_fixed_and_scaled():
    data = digits_data.load()
    assert (len(data.train_x), len(data.test_x)) == (1347, 450)
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_x.dtype == torch.float32
    assert 0 <= data.train_x.min() and data.train_x.max() == 1
    again = digits_data.load(limit=10)
    assert torch.equal(again.train_x, data.train_x[:10])
    assert torch.equal(again.test_y, data.test_y[:10])
    assert set(data.test_y.tolist()) == set(range(10))  # stratified: every class is tested


def test_all_workflows_tiny(tmp_path, capsys):
    results = train_digits.main(["--limit", "64", "--epochs", "1", "--quiet", "--seed", "3",
                                 "--pictures", str(tmp_path), "--save", str(tmp_path)])
    out = capsys.readouterr().out
    assert [r.workflow for r in results] == ["lenet", "random", "kmeans"]
    assert "digits: 64 training, 64 test" in out
    data = digits_data.load(64)
    torch.manual_seed(3)
    initial_random = convdsl.compile(PROGRAM, net="DigitsRandom").state_dict()
    for result in results:
        assert f"test {result.test_accuracy:7.2%}" in out
        state = torch.load(tmp_path / f"{result.net}.pt", weights_only=True)
        # The accuracy the script prints is the saved net's, recomputed independently.
        assert result.test_accuracy == pytest.approx(
            _reference_accuracy(result.net, state, data.test_x, data.test_y))
        rows = decode_png((tmp_path / f"{result.net}_h.png").read_bytes())
        assert len(rows) > 8 and len({v for r in rows for v in r}) > 2
    random_state = torch.load(tmp_path / "DigitsRandom.pt", weights_only=True)
    assert torch.equal(random_state["h.weight"], initial_random["h.weight"])   # frozen
    assert not torch.equal(random_state["dense.weight"], initial_random["dense.weight"])
    # The k-means kernels are the seeded fit on the training digits, untouched by training.
    kmeans = convdsl.compile(PROGRAM, net="DigitsKMeans", backend="torch")
    fit_kmeans_layers(kmeans, torch.load(tmp_path / "digits_train.pt", weights_only=True), seed=3)
    kmeans_state = torch.load(tmp_path / "DigitsKMeans.pt", weights_only=True)
    torch.testing.assert_close(kmeans_state["h.weight"], kmeans.state_dict()["h.weight"])


def test_end_to_end_training_lowers_the_loss():
    data = digits_data.load(96)
    torch.manual_seed(0)
    net = convdsl.compile(PROGRAM, net="DigitsLeNet", backend="torch")

    def loss():
        with torch.no_grad():
            return F.cross_entropy(net(data.train_x), data.train_y).item()

    before = loss()
    train_digits.train(net, data, epochs=4, lr=3e-3, batch_size=32, seed=0, show_progress=False)
    assert loss() < 0.7 * before


def test_line_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm.auto` now fails
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    data = digits_data.load(40)
    net = convdsl.compile(PROGRAM, net="DigitsRandom", backend="torch")
    train_digits.train(net, data, epochs=2, lr=1e-2, batch_size=32, seed=0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2  # a line per epoch (2 batches each)
    assert re.fullmatch(r"DigitsRandom: 2/4 epoch 1/2 loss \d+\.\d{4}", err[0])
    assert re.fullmatch(r"DigitsRandom: 4/4 epoch 2/2 loss \d+\.\d{4}", err[1])


@pytest.mark.parametrize("argv", [["--limit", "0"], ["--epochs", "0"], ["--workflow", "x"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        train_digits.main(argv)


def test_triton_backend_equals_torch(tmp_path):
    """The random-features workflow on generated kernels (interpreted) learns the same weights.
    (Two Adam steps only: the interpreter is slow. tests/test_examples_backends.py compares
    the digits nets' gradients themselves.)"""
    common = ["--workflow", "random", "--limit", "8", "--epochs", "1", "--batch-size", "4",
              "--quiet"]
    (tri,) = train_digits.main([*common, "--backend", "triton", "--save", str(tmp_path / "t")])
    (ref,) = train_digits.main([*common, "--backend", "torch", "--save", str(tmp_path / "r")])
    a = torch.load(tmp_path / "t" / "DigitsRandom.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / "DigitsRandom.pt", weights_only=True)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    assert tri.test_accuracy == ref.test_accuracy


@pytest.mark.slow
@pytest.mark.parametrize("workflow", ["lenet", "kmeans"])
def test_triton_backend_other_workflows(tmp_path, workflow):
    common = ["--workflow", workflow, "--limit", "24", "--epochs", "1", "--batch-size", "12",
              "--quiet"]
    train_digits.main([*common, "--backend", "triton", "--save", str(tmp_path / "t")])
    train_digits.main([*common, "--backend", "torch", "--save", str(tmp_path / "r")])
    net = train_digits.WORKFLOWS[workflow].net
    a = torch.load(tmp_path / "t" / f"{net}.pt", weights_only=True)
    b = torch.load(tmp_path / "r" / f"{net}.pt", weights_only=True)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
