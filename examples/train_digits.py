"""Train the nets of examples/digits.cdsl on scikit-learn's 8x8 digits and print
their test accuracy: the three workflows of the Deep Learning book's chapter 9.

  lenet   DigitsLeNet trained end to end (9.1-9.3)
  random  DigitsRandom: frozen random conv features, only the last layer trained (9.9)
  kmeans  DigitsKMeans: conv kernels from k-means on whitened patches
          (`fit_features`, Coates et al.), then only the last layer trained (9.9)

Usage:
  python examples/train_digits.py                        # all three, torch backend
  python examples/train_digits.py --workflow kmeans --backend triton --epochs 3
  python examples/train_digits.py --limit 64 --epochs 1  # a quick smoke run
  python examples/train_digits.py --pictures out/ --save out/   # kernel PNGs, state_dicts

Needs scikit-learn (`pip install 'convdsl[examples]'`); shows tqdm progress bars
when tqdm is installed, a line per epoch otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script or imported by the tests
    sys.path.insert(0, str(HERE))

import digits_data

import convdsl
from convdsl.kmeans import fit_kmeans_layers
from convdsl.pictures import draw_layer

PROGRAM = HERE / "digits.cdsl"
EVAL_BATCH = 256


@dataclass(frozen=True)
class Workflow:
    net: str
    epochs: int
    lr: float
    fit_features: bool = False  # fill the init=kmeans layer from the training digits first
    picture_layer: str = "h"  # the first conv layer, drawn by --pictures


# Tuned on the torch backend (see the README's "Section 9.9 on the digits").
WORKFLOWS = {
    "lenet": Workflow("DigitsLeNet", epochs=40, lr=3e-3),
    "random": Workflow("DigitsRandom", epochs=40, lr=1e-2),
    "kmeans": Workflow("DigitsKMeans", epochs=40, lr=1e-2, fit_features=True),
}


@dataclass
class Result:
    workflow: str
    net: str
    backend: str
    epochs: int
    train_accuracy: float
    test_accuracy: float
    seconds: float


# -- progress --------------------------------------------------------------------------------

class _LineProgress:
    """tqdm's update / set_postfix_str / close, printing a line per epoch instead."""

    def __init__(self, total: int, desc: str, steps_per_line: int):
        self.total, self.desc, self.steps_per_line = total, desc, max(steps_per_line, 1)
        self.n, self.postfix = 0, ""

    def update(self, steps: int = 1) -> None:
        self.n += steps
        if self.n % self.steps_per_line == 0 or self.n == self.total:
            print(f"{self.desc}: {self.n}/{self.total} {self.postfix}", file=sys.stderr)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


class _NoProgress(_LineProgress):
    def update(self, steps: int = 1) -> None:
        self.n += steps


def progress_bar(total: int, desc: str, steps_per_line: int, enabled: bool = True):
    if not enabled:
        return _NoProgress(total, desc, steps_per_line)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineProgress(total, desc, steps_per_line)
    return tqdm(total=total, desc=desc, leave=False)


# -- training --------------------------------------------------------------------------------

def accuracy(net, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH):
            logits = net(x[start:start + EVAL_BATCH])
            correct += int((logits.argmax(dim=1) == y[start:start + EVAL_BATCH]).sum())
    return correct / max(len(x), 1)


def train(net, data: digits_data.Digits, *, epochs: int, lr: float, batch_size: int, seed: int,
          show_progress: bool = True) -> None:
    """Adam on the cross-entropy of the trainable parameters (the frozen ones stay put)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    # Halve the step size twice over the run: the last epochs settle into a minimum.
    schedule = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(epochs * 0.6), int(epochs * 0.85)], gamma=0.3)
    order = torch.Generator().manual_seed(seed)
    batches = -(-len(data.train_x) // batch_size)
    bar = progress_bar(epochs * batches, net.name, batches, show_progress)
    try:
        for epoch in range(epochs):
            total, seen = 0.0, 0
            for index in torch.randperm(len(data.train_x), generator=order).split(batch_size):
                optimizer.zero_grad()
                loss = F.cross_entropy(net(data.train_x[index]), data.train_y[index])
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(index), seen + len(index)
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} loss {total / seen:.4f}")
                bar.update(1)
            schedule.step()
    finally:
        bar.close()


def run_workflow(name: str, data: digits_data.Digits, *, backend: str = "torch",
                 epochs: int | None = None, lr: float | None = None, batch_size: int = 32,
                 seed: int = 0, pictures: Path | None = None, save: Path | None = None,
                 show_progress: bool = True) -> Result:
    workflow = WORKFLOWS[name]
    epochs = workflow.epochs if epochs is None else epochs
    lr = workflow.lr if lr is None else lr
    start = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights
    net = convdsl.compile(PROGRAM, net=workflow.net, backend=backend)
    if workflow.fit_features:
        # net.fit_features(x) with the seed and a progress bar made explicit.
        fit_kmeans_layers(net, data.train_x, seed=seed, progress=show_progress)
    train(net, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
          show_progress=show_progress)
    net.eval()
    result = Result(name, workflow.net, backend, epochs, accuracy(net, data.train_x, data.train_y),
                    accuracy(net, data.test_x, data.test_y), time.perf_counter() - start)
    if pictures is not None:
        pictures.mkdir(parents=True, exist_ok=True)
        layer = workflow.picture_layer
        draw_layer(net, layer, pictures / f"{workflow.net}_{layer}.png")
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), save / f"{workflow.net}.pt")
    return result


# -- command line ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workflow", choices=(*WORKFLOWS, "all"), default="all")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch",
                   help="triton runs the generated kernels (interpreted without a GPU: slow)")
    defaults = ", ".join(f"{name} {w.epochs}" for name, w in WORKFLOWS.items())
    p.add_argument("--epochs", type=int, help=f"default: per workflow ({defaults})")
    p.add_argument("--lr", type=float, help="Adam's step size (default: per workflow)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="use at most this many training and test digits")
    p.add_argument("--seed", type=int, default=0, help="initial weights, k-means, batch order")
    p.add_argument("--pictures", type=Path, help="write each net's first-layer kernels as PNG here")
    p.add_argument("--save", type=Path, help="write each net's state_dict (NET.pt) and the "
                                             "training digits (digits_train.pt) here")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these nets are too small to share)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv=None) -> list[Result]:
    args = _parser().parse_args(argv)
    for flag in ("epochs", "batch_size", "limit", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    data = digits_data.load(args.limit)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        torch.save(data.train_x, args.save / "digits_train.pt")
    names = list(WORKFLOWS) if args.workflow == "all" else [args.workflow]
    print(f"digits: {len(data.train_x)} training, {len(data.test_x)} test "
          f"(backend {args.backend}, seed {args.seed})")
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for name in names:
            result = run_workflow(name, data, backend=args.backend, epochs=args.epochs,
                                  lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                  pictures=args.pictures, save=args.save,
                                  show_progress=not args.quiet)
            print(f"{result.workflow:7} {result.net:13} epochs {result.epochs:3}  "
                  f"train {result.train_accuracy:7.2%}  test {result.test_accuracy:7.2%}  "
                  f"({result.seconds:.1f} s)", flush=True)
            results.append(result)
    finally:
        torch.set_num_threads(threads)
    return results


if __name__ == "__main__":
    main()
