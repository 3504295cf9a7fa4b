"""Every example net in examples/*.cdsl checks, compiles, runs forward and backward.

For each file and each net in it:
- `convdsl check FILE` succeeds;
- `convdsl.compile(FILE, net=NAME, backend="torch")` works, twice with the same IR text;
- a forward pass on small random inputs gives finite outputs of the expected rank
  (init=kmeans nets are fitted with `fit_features` on random data first);
- a backward pass gives a finite gradient for every trainable parameter.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl.cli import main as cli_main
from convdsl.compiler import load_program
from convdsl.module import STAGES  # parsed, optimized (and backward where the compiler has it)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FILES = sorted(EXAMPLES.glob("*.cdsl"))

DEFAULT_BATCH = 2
DEFAULT_SPATIAL = 16

# Sizes of the size symbols, per file (and, where nets need different sizes, per
# net as "file:Net"). Unlisted symbols: N=2, any other 16.
SIZES = {
    "lenet5.cdsl": {"H": 20, "W": 24},
    "tdnn_audio.cdsl:WaveformTDNN": {"T": 200},
    "tdnn_audio.cdsl:MfccTDNN": {"T": 23},
    "skeleton_1d.cdsl": {"T": 21},
    "spectrogram_2d.cdsl": {"T": 19},
    "volumetric_3d.cdsl": {"D": 8, "H": 11, "W": 12},      # odd sizes for the deconv
    "video_3d.cdsl": {"T": 6, "H": 12, "W": 13},
    "autoencoder.cdsl": {"H": 17, "W": 20},                # odd H: size= picks 17
    "recurrent_labels.cdsl": {"H": 12, "W": 10},
    "tiled.cdsl": {"H": 15, "W": 16, "T": 33},
    "inception.cdsl": {"H": 13, "W": 16},
    "kmeans_features.cdsl": {"H": 12, "W": 12},            # k-means fitting dominates
}

# The rank of every output of every net (a tuple: one entry per returned tensor).
EXPECTED_RANKS = {
    "LeNet5": (2,), "FixedSize": (2,), "AnySize": (2,), "FullyConv": (2,),
    "AlexNet": (2,),
    "WaveformTDNN": (2,), "MfccTDNN": (2,),
    "SkeletonAction": (2,), "SkeletonFrames": (3,),
    "SpectrogramClassifier": (2,), "SpectrogramTagger": (4,),
    "VolumeClassifier": (2,), "VolumeSegmenter": (5,),
    "VideoClassifier": (2,), "VideoFactorized": (2,),
    "MaxoutConv": (2,), "MaxoutMLP": (2,),
    "InceptionNet": (2,),
    "FaceLocal": (2,),
    "TiledNet": (2,), "TiledSignal": (2,),
    "TiedAutoencoder": (4,), "TiedAutoencoderRGB": (4, 4),
    "RecurrentLabeler": (4,),
    "GaborNet": (2,), "EdgeNet": (2,),
    "RandomFeatures": (2,),
    "KMeansQuadrants": (2,), "KMeansTwoLayer": (2,),
    "SeparableNet": (2,), "DepthwiseSeparableNet": (2,), "DifferenceOfGaussians": (4,),
    "FoundSeparable": (2,),
    "DigitsLeNet": (2,), "DigitsRandom": (2,), "DigitsKMeans": (2,),
}

# A few nets whose outputs have a known exact shape, given the sizes above.
EXPECTED_SHAPES = {
    "TiedAutoencoder": [(2, 1, 17, 20)],
    "TiedAutoencoderRGB": [(2, 16, 9, 10), (2, 3, 17, 20)],
    "VolumeSegmenter": [(2, 3, 8, 11, 12)],
    "SkeletonFrames": [(2, 5, 21)],
    "SpectrogramTagger": [(2, 4, 1, 19)],
    "RecurrentLabeler": [(2, 4, 12, 10)],
}

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _cases():
    cases = []
    for path in FILES:
        for name in load_program(path).nets:
            cases.append(pytest.param(path, name, id=f"{path.name}:{name}"))
    return cases


CASES = _cases()


def _sizes(path: Path, net: str) -> dict[str, int]:
    sizes = dict(SIZES.get(path.name, {}))
    sizes.update(SIZES.get(f"{path.name}:{net}", {}))
    return sizes


def _random_inputs(path: Path, net: str, seed: int = 0, sizes: dict | None = None):
    sizes = _sizes(path, net) if sizes is None else sizes
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for inp in load_program(path).nets[net].inputs:
        shape = []
        for i, dim in enumerate(inp.dims):
            if isinstance(dim.value, int):
                shape.append(dim.value)
            else:
                shape.append(sizes.get(dim.value, DEFAULT_BATCH if i == 0 else DEFAULT_SPATIAL))
        x = torch.randn(*shape, generator=generator)
        inputs.append(x.to(DTYPES[inp.dtype]))
    return inputs


def _compile(path: Path, net: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error", convdsl.ConvDSLWarning)   # examples must be warning-free
        return convdsl.compile(path, net=net, backend="torch")


def _needs_fit(module) -> bool:
    return "init=kmeans" in module.ir()


def test_there_are_enough_examples():
    assert len(FILES) >= 16
    assert {p.name for p in FILES} >= {
        "alexnet.cdsl", "tdnn_audio.cdsl", "skeleton_1d.cdsl", "spectrogram_2d.cdsl",
        "volumetric_3d.cdsl", "video_3d.cdsl", "maxout.cdsl", "inception.cdsl",
        "faces_local.cdsl", "tiled.cdsl", "autoencoder.cdsl", "recurrent_labels.cdsl",
        "gabor_frontend.cdsl", "random_features.cdsl", "kmeans_features.cdsl",
        "separable_blur.cdsl", "digits.cdsl"}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_header_comment(path):
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must start with a header comment"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_check_succeeds(path, capsys):
    assert cli_main(["check", str(path)]) == 0
    out = capsys.readouterr()
    for name in load_program(path).nets:
        assert f"net {name}" in out.out
    assert "warning" not in out.err


@pytest.mark.parametrize("path,net", CASES)
def test_every_net_has_expected_ranks(path, net):
    assert net in EXPECTED_RANKS, f"add {net} to EXPECTED_RANKS"


@pytest.mark.parametrize("path,net", CASES)
def test_ir_is_deterministic(path, net):
    first, second = _compile(path, net), _compile(path, net)
    for stage in STAGES:
        assert first.ir(stage) == second.ir(stage), f"{net}: {stage} IR differs"
    assert list(first.state_dict()) == list(second.state_dict())


@pytest.mark.parametrize("path,net", CASES)
def test_forward_backward(path, net):
    torch.manual_seed(0)
    module = _compile(path, net)
    inputs = _random_inputs(path, net)
    if _needs_fit(module):
        # Fit the k-means layers on random data of the net's input shape.
        module.fit_features(_random_inputs(path, net, seed=1)[0])

    outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert tuple(o.dim() for o in outputs) == EXPECTED_RANKS[net]
    for o in outputs:
        assert o.shape[0] == inputs[0].shape[0]
        assert torch.isfinite(o).all(), f"{net}: non-finite output"
    if net in EXPECTED_SHAPES:
        assert [tuple(o.shape) for o in outputs] == EXPECTED_SHAPES[net]

    # Backward through a fixed random weighting of the outputs (a plain sum would
    # give zero gradients through a softmax, whose outputs sum to one).
    generator = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum()
               for o in outputs)
    loss.backward()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable, f"{net} has no trainable parameter"
    for name, param in trainable:
        assert param.grad is not None, f"{net}: no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"{net}: non-finite gradient for {name}"
    for name, param in module.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"{net}: frozen {name} got a gradient"
    assert module.parameter_count() > 0


def _variable_size_cases():
    cases = []
    for path in FILES:
        for name, net in load_program(path).nets.items():
            if any(isinstance(d.value, str) for inp in net.inputs for d in inp.dims[2:]):
                cases.append(pytest.param(path, name, id=f"{path.name}:{name}"))
    return cases


@pytest.mark.parametrize("path,net", _variable_size_cases())
def test_variable_size_nets_run_at_another_size(path, net):
    """Nets with symbolic spatial sizes (9.7) also run at larger, odd sizes."""
    module = _compile(path, net)
    bigger = {}
    for inp in load_program(path).nets[net].inputs:
        for dim in inp.dims[2:]:
            if isinstance(dim.value, str):
                bigger[dim.value] = _sizes(path, net).get(dim.value, DEFAULT_SPATIAL) + 3
    inputs = _random_inputs(path, net, seed=4, sizes=dict(_sizes(path, net), **bigger))
    if _needs_fit(module):
        module.fit_features(inputs[0])
    with torch.no_grad():
        outputs = module(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert tuple(o.dim() for o in outputs) == EXPECTED_RANKS[net]
    assert all(torch.isfinite(o).all() for o in outputs)
