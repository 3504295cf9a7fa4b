"""Every example net gives the same results on both backends: forward outputs,
parameter gradients and input gradients of the generated Triton kernels (under
the interpreter without a GPU) equal the torch backend's, in float32 with
rtol/atol 1e-4 (relative to the output's magnitude).

The interpreter is slow, so the inputs are small: N=2 and, for symbolic sizes,
the small sizes below (every net accepts them); fixed-size nets run at their
size. The default run checks FAST, a few nets that together use every op kind
of the examples (test_fast_nets_cover_every_op_kind keeps it so); all nets run
with `-m slow`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl.compiler import load_program

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.glob("*.cdsl"))

BATCH = 2
FIT_BATCH = 16  # inputs for fit_features (k-means nets)
DEFAULT_SIZE = {"H": 7, "W": 6}  # odd and even, and not the multiples the nets pool by
SIZES = {  # nets that need other (larger) sizes
    "WaveformTDNN": {"T": 65},         # the strided front end and three dilated convs
    "MfccTDNN": {"T": 17},             # three valid convs see 15 frames
    "SpectrogramClassifier": {"T": 9},
    "SpectrogramTagger": {"T": 7},
    "SkeletonAction": {"T": 7},
    "SkeletonFrames": {"T": 7},
    "TiledSignal": {"T": 9},
    "KMeansQuadrants": {"H": 7, "W": 8},  # a valid 5x5 conv, then quadrants
    "VideoClassifier": {"T": 4, "H": 5, "W": 6},
    "VideoFactorized": {"T": 4, "H": 5, "W": 6},
    "VolumeClassifier": {"D": 4, "H": 5, "W": 6},
    "VolumeSegmenter": {"D": 4, "H": 5, "W": 6},
}

# Together these use every op kind (IR op name, forward and backward) of the
# examples except SLOW_ONLY's; test_fast_nets_cover_every_op_kind checks it.
# Variants of an op (3-D, grouped, trained separable factors, ...) that only
# other nets use are compared in the slow run.
FAST = ("TiedAutoencoder", "InceptionNet", "GaborNet", "MaxoutMLP", "MfccTDNN",
        "SkeletonFrames", "DifferenceOfGaussians", "TiledSignal", "FoundSeparable")

# Op kinds only fixed-size nets use, too slow for the default run (about 30 s
# each interpreted); their kernels have fast tests of their own in tests/triton/.
SLOW_ONLY = {
    "local": "FaceLocal (32x32 input)",
    "_local_dx": "FaceLocal (32x32 input)",
    "_local_dw": "FaceLocal (32x32 input)",
    "tanh": "LeNet5 (32x32 input)",
    "_tanh_dx": "LeNet5 (32x32 input)",
}

RTOL = ATOL = 1e-4


def _cases(names=None):
    cases = []
    for path in FILES:
        for net in load_program(path).nets:
            if names is None or net in names:
                cases.append(pytest.param(path, net, id=f"{path.name}:{net}"))
    return cases


def _inputs(path: Path, net: str, generator: torch.Generator,
            batch: int = BATCH) -> list[torch.Tensor]:
    sizes = SIZES.get(net, DEFAULT_SIZE)
    inputs = []
    for inp in load_program(path).nets[net].inputs:
        shape = [d.value if isinstance(d.value, int) else batch if i == 0 else sizes[d.value]
                 for i, d in enumerate(inp.dims)]
        inputs.append(torch.randn(shape, generator=generator))
    return inputs


def _compile(path: Path, net: str, backend: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", convdsl.ConvDSLWarning)
        return convdsl.compile(path, net=net, backend=backend)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=what)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_backends_agree(path: Path, net: str) -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = _compile(path, net, "torch")
    if reference._kmeans_pending:  # real k-means kernels, fitted on random inputs
        # (enough of them for one patch per centroid at these small sizes)
        reference.fit_features(_inputs(path, net, generator, batch=FIT_BATCH)[0])
    triton = _compile(path, net, "triton")
    triton.load_state_dict(reference.state_dict())

    inputs = _inputs(path, net, generator)
    ref_in = [x.clone().requires_grad_() for x in inputs]
    tri_in = [x.clone().requires_grad_() for x in inputs]
    ref_out, tri_out = _as_tuple(reference(*ref_in)), _as_tuple(triton(*tri_in))
    assert len(ref_out) == len(tri_out)
    for i, (a, b) in enumerate(zip(tri_out, ref_out)):
        _close(a, b, f"{net}: output {i}")

    # A fixed random weighting of the outputs (a plain sum has zero gradient
    # through a softmax).
    weights = [torch.randn(o.shape, generator=generator) for o in ref_out]
    sum((o * w).sum() for o, w in zip(ref_out, weights)).backward()
    sum((o * w).sum() for o, w in zip(tri_out, weights)).backward()
    for i, (a, b) in enumerate(zip(tri_in, ref_in)):
        _close(a.grad, b.grad, f"{net}: gradient of input {i}")
    tri_params = dict(triton.named_parameters())
    checked = 0
    for name, param in reference.named_parameters():
        if param.grad is None:
            assert tri_params[name].grad is None, f"{net}: frozen {name} got a gradient"
            continue
        _close(tri_params[name].grad, param.grad, f"{net}: gradient of {name}")
        checked += 1
    assert checked > 0, f"{net}: no trainable parameter"


@pytest.mark.parametrize("path,net", _cases(FAST))
def test_fast_nets_agree(path, net):
    check_backends_agree(path, net)


@pytest.mark.slow
@pytest.mark.parametrize("path,net", [c for c in _cases() if c.values[1] not in FAST])
def test_every_other_net_agrees(path, net):
    check_backends_agree(path, net)


def _op_kinds(net) -> set[str]:
    """The forward op kinds of a net (its parsed IR) and of its derived backward graph."""
    forward = {node.op for node in net._graphs["parsed"].nodes()}
    backward = {node.op for node in net.backward().graph.nodes()}
    return forward | backward


def test_fast_nets_cover_every_op_kind():
    everywhere, fast = set(), set()
    for case in _cases():
        path, name = case.values
        kinds = _op_kinds(_compile(path, name, "torch"))
        everywhere |= kinds
        if name in FAST:
            fast |= kinds
    assert everywhere - fast - set(SLOW_ONLY) == set(), "add a net using these ops to FAST"
    assert set(SLOW_ONLY) <= everywhere, "SLOW_ONLY names an op no example uses any more"


def test_every_net_has_usable_sizes():
    """Every symbolic size of every example net is set here (or by the default)."""
    for case in _cases():
        path, name = case.values
        sizes = SIZES.get(name, DEFAULT_SIZE)
        for inp in load_program(path).nets[name].inputs:
            for dim in inp.dims[1:]:
                assert isinstance(dim.value, int) or dim.value in sizes, (name, dim.value)
