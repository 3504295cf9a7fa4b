"""The benchmark cases, as data.

A layer case is a small .cdsl net (text made here from concrete sizes) and an
independent eager PyTorch implementation of the same layer over the same
parameters: what a user would otherwise run. The eager version is the
baseline (torch.compile builds on it too) and the numerical check of the
generated kernels. `sizes` are the GPU sizes (ResNet / MobileNet-like
layers), `smoke` tiny ones for the CPU smoke run under the interpreter.

Example nets are timed whole, against their torch-backend lowering (each op one
PyTorch call) and torch.compile of it; EXAMPLE_SIZES gives their GPU sizes."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Which target of issue 7 a case counts towards (report.py evaluates them).
GROUPS = ("conv", "grouped", "table", "depthwise", "dw_pw", "separable", "fused_block", "local",
          "tiled", "deconv", "pool")


@dataclass(frozen=True)
class LayerCase:
    name: str
    group: str
    net: Callable[[str, dict], str]  # (input dtype, sizes) -> .cdsl text of `net Case(x: ...)`
    reference: Callable[[torch.Tensor, dict], torch.Tensor]  # (x, params by name) -> output
    sizes: dict  # N, C, H, W and case-specific sizes on a GPU
    smoke: dict  # the same keys, tiny, for the interpreter
    baseline: str = "PyTorch eager (cuDNN)"  # what the eager reference is
    # in priority order; tf32: f32 activations, TF32 tensor cores (where a kernel has
    # none, as pooling, only bf16 and exact f32)
    dtypes: tuple = ("bf16", "tf32", "f32")
    max_autotune: bool = False  # also time torch.compile(mode="max-autotune") (slow to build)
    bandwidth_bound: bool = False  # report GB/s against the device's copy bandwidth
    priority: int = 1  # 0 first: the cases the targets need most
    note: str = ""
    extra: dict = field(default_factory=dict)


def _input(dtype: str, s: dict) -> str:
    return f"x: {dtype}[N, {s['C']}, {s['H']}, {s['W']}]"


def _net(body: str) -> Callable[[str, dict], str]:
    """A one-input net whose body is `body` formatted with the sizes."""
    def text(dtype: str, s: dict) -> str:
        return f"net Case({_input(dtype, s)}) {{\n    {body.format(**s)}\n}}\n"
    return text


def _param(p: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return p[name].to(x.dtype)


# -- references ---------------------------------------------------------------------------------

def conv_reference(stride=1, padding=0, layer="c"):
    """F.conv2d; the groups follow from the weight (depthwise: one input channel each)."""
    def ref(x, p):
        weight = _param(p, f"{layer}.weight", x)
        return F.conv2d(x, weight, _param(p, f"{layer}.bias", x), stride=stride,
                        padding=padding, groups=x.shape[1] // weight.shape[1])
    return ref


def deconv_reference(stride: int, padding: int):
    def ref(x, p):
        return F.conv_transpose2d(x, _param(p, "c.weight", x), _param(p, "c.bias", x),
                                  stride=stride, padding=padding)
    return ref


def separable_dense_reference(padding: int):
    """cuDNN on the dense kernel the separable factors multiply out to (made once,
    outside the timed call: a dense layer stores its kernel dense)."""
    cache = {}

    def ref(x, p):
        key = (p["c.weight_0"].data_ptr(), p["c.weight_0"]._version, x.dtype)
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = torch.einsum("oci,ocj->ocij", p["c.weight_0"].float(),
                                          p["c.weight_1"].float()).to(x.dtype)
        dense = cache[key]
        if torch.is_grad_enabled() and p["c.weight_0"].requires_grad:  # training: through
            # the factors, as a PyTorch separable parameterization would
            dense = torch.einsum("oci,ocj->ocij", p["c.weight_0"].to(x.dtype),
                                 p["c.weight_1"].to(x.dtype))
        return F.conv2d(x, dense, _param(p, "c.bias", x), padding=padding)
    return ref


def block_reference(x, p):
    """conv 3x3 (pad 1) + bias + relu + 2x2 max pool: four eager calls."""
    y = F.conv2d(x, _param(p, "c.weight", x), _param(p, "c.bias", x), padding=1)
    return F.max_pool2d(F.relu(y), 2)


def dw_pw_reference(x, p):
    y = F.conv2d(x, _param(p, "d.weight", x), _param(p, "d.bias", x), padding=1,
                 groups=x.shape[1])
    return F.conv2d(y, _param(p, "c.weight", x), _param(p, "c.bias", x))


def local_reference(kernel: int):
    """Unfold-and-einsum: the usual PyTorch locally connected layer (eq. 9.9)."""
    def ref(x, p):
        w = _param(p, "c.weight", x)  # [out, oh, ow, in, k, k]
        out, oh, ow = w.shape[:3]
        cols = F.unfold(x, kernel)  # [N, in*k*k, oh*ow]
        y = torch.einsum("nkl,olk->nol", cols, w.reshape(out, oh * ow, -1))
        return y.reshape(x.shape[0], out, oh, ow) + _param(p, "c.bias", x)
    return ref


def tiled_reference(kernel: int, tiles: int):
    """Unfold-and-einsum with each output position's kernel stack picked by
    position mod tiles (eq. 9.10)."""
    def ref(x, p):
        w = _param(p, "c.weight", x)  # [t, t, out, in, k, k]
        b = _param(p, "c.bias", x)  # [t, t, out]
        oh, ow = x.shape[2] - kernel + 1, x.shape[3] - kernel + 1
        rows = torch.arange(oh, device=x.device) % tiles
        cols = torch.arange(ow, device=x.device) % tiles
        per_position = w[rows[:, None], cols[None, :]]  # [oh, ow, out, in, k, k]
        unfolded = F.unfold(x, kernel)  # [N, in*k*k, oh*ow]
        y = torch.einsum("nkl,lok->nol", unfolded,
                         per_position.reshape(oh * ow, w.shape[2], -1))
        bias = b[rows[:, None], cols[None, :]].permute(2, 0, 1)  # [out, oh, ow]
        return y.reshape(x.shape[0], w.shape[2], oh, ow) + bias
    return ref


def wavg_reference(window: int, sigma: float, stride: int):
    """Gaussian-weighted average pooling without padding: a depthwise conv with
    one normalised Gaussian (every window has all its taps)."""
    def ref(x, _p):
        d = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
        g = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2 * sigma ** 2))
        g = (g / g.sum()).to(x.device, x.dtype)
        c = x.shape[1]
        return F.conv2d(x, g.expand(c, 1, window, window), stride=stride, groups=c)
    return ref


def maxout_reference(pieces: int):
    def ref(x, _p):
        n, c = x.shape[:2]
        return x.reshape(n, c // pieces, pieces, *x.shape[2:]).amax(2)
    return ref


def table_text(rows: int, inputs: int, fan_in: int) -> str:
    """A fixed sparse connection table: output o reads fan_in inputs starting
    at o (cyclically), like LeNet-5's C3 but wider."""
    table = [sorted({(o + i * (inputs // fan_in)) % inputs for i in range(fan_in)})
             for o in range(rows)]
    return "[" + ", ".join("[" + ", ".join(map(str, r)) + "]" for r in table) + "]"


def table_net(dtype: str, s: dict) -> str:
    return (f"table T = {table_text(s['O'], s['C'], s['F'])}\n"
            f"net Case({_input(dtype, s)}) {{\n"
            f"    c = conv(x, {s['O']}, kernel=3, pad=1, connect=T)\n    return c\n}}\n")


# -- the cases ----------------------------------------------------------------------------------

TINY = {"N": 1, "C": 4, "H": 8, "W": 8, "O": 4}
NO_DOT = ("bf16", "f32")  # kernels without a matrix product: TF32 does not apply


def _conv(name, c, o, h, k, stride, priority=0, groups=1, max_autotune=True, group="conv"):
    pad = k // 2
    extra = ", groups={G}" if groups > 1 else ""
    smoke = {**TINY, "G": 2, "C": 8, "O": 8} if groups > 1 else TINY
    return LayerCase(
        name, group,
        _net(f"c = conv(x, {{O}}, kernel={k}, stride={stride}, pad={pad}{extra})\n    return c"),
        conv_reference(stride, pad), {"N": 32, "C": c, "H": h, "W": h, "O": o, "G": groups},
        smoke, max_autotune=max_autotune, priority=priority)


CASES: list[LayerCase] = [
    # ResNet-50-style layers (plain conv; the >= 0.9x cuDNN target's geomean)
    _conv("conv3x3_c64_56", 64, 64, 56, 3, 1),
    _conv("conv3x3_c128_28_s2", 64, 128, 56, 3, 2),
    _conv("conv3x3_c256_14", 256, 256, 14, 3, 1),
    _conv("conv1x1_c256to64_56", 256, 64, 56, 1, 1),
    _conv("conv1x1_c256to512_s2", 256, 512, 56, 1, 2),
    _conv("conv3x3_c128_g32_28", 128, 128, 28, 3, 1, priority=1, groups=32,
          max_autotune=False, group="grouped"),
    LayerCase("table_conv3x3_c64_32", "table", table_net,
              conv_reference(1, 1), {"N": 32, "C": 64, "H": 32, "W": 32, "O": 64, "F": 16},
              {**TINY, "O": 4, "F": 2}, baseline="cuDNN dense conv, zeros outside the table",
              priority=1),
    LayerCase("depthwise3x3_c128_56", "depthwise",
              _net("d = depthwise(x, 3, pad=1)\n    return d"), conv_reference(1, 1, "d"),
              {"N": 32, "C": 128, "H": 56, "W": 56}, TINY, dtypes=NO_DOT, priority=0),
    LayerCase("depthwise3x3_c256_28_s2", "depthwise",
              _net("d = depthwise(x, 3, stride=2, pad=1)\n    return d"),
              conv_reference(2, 1, "d"),
              {"N": 32, "C": 256, "H": 56, "W": 56}, TINY, dtypes=NO_DOT, priority=1),
    LayerCase("dw3x3_pw1x1_c128_56", "dw_pw",
              _net("d = depthwise(x, 3, pad=1)\n    c = conv(d, {C}, kernel=1)\n    return c"),
              dw_pw_reference, {"N": 32, "C": 128, "H": 56, "W": 56}, TINY, priority=0),
    LayerCase("separable7x7_c32_64", "separable",
              _net("c = conv(x, {O}, kernel=7, pad=3, separable=true)\n    return c"),
              separable_dense_reference(3), {"N": 32, "C": 32, "H": 64, "W": 64, "O": 32},
              {**TINY, "H": 9, "W": 9}, baseline="cuDNN on the dense 7x7 kernel", priority=0),
    LayerCase("separable11x11_c32_64", "separable",
              _net("c = conv(x, {O}, kernel=11, pad=5, separable=true)\n    return c"),
              separable_dense_reference(5), {"N": 32, "C": 32, "H": 64, "W": 64, "O": 32},
              {**TINY, "H": 12, "W": 12}, baseline="cuDNN on the dense 11x11 kernel",
              priority=1),
    LayerCase("block_conv3x3_relu_maxpool_c64_56", "fused_block",
              _net("c = conv(x, {O}, kernel=3, pad=1)\n    return maxpool(relu(c), 2)"),
              block_reference, {"N": 32, "C": 64, "H": 56, "W": 56, "O": 64}, TINY,
              baseline="eager conv2d + relu + max_pool2d", max_autotune=True, priority=0),
    LayerCase("block_conv3x3_relu_maxpool_c128_28", "fused_block",
              _net("c = conv(x, {O}, kernel=3, pad=1)\n    return maxpool(relu(c), 2)"),
              block_reference, {"N": 32, "C": 128, "H": 28, "W": 28, "O": 128}, TINY,
              baseline="eager conv2d + relu + max_pool2d", max_autotune=True, priority=1),
    LayerCase("local3x3_c32_32", "local",
              _net("c = local(x, {O}, kernel=3)\n    return c"), local_reference(3),
              {"N": 32, "C": 32, "H": 32, "W": 32, "O": 32}, TINY,
              baseline="unfold + einsum", dtypes=("f32", "bf16", "tf32"), priority=0),
    LayerCase("tiled3x3_t2_c32_32", "tiled",
              _net("c = tiled(x, {O}, kernel=3, tiles=2)\n    return c"), tiled_reference(3, 2),
              {"N": 32, "C": 32, "H": 32, "W": 32, "O": 32}, TINY,
              baseline="unfold + einsum, kernels gathered per position",
              dtypes=("f32", "bf16", "tf32"),
              priority=1),
    LayerCase("deconv4x4_s2_c64to32_28", "deconv",
              _net("c = deconv(x, {O}, kernel=4, stride=2, pad=1)\n    return c"),
              deconv_reference(2, 1),
              {"N": 32, "C": 64, "H": 28, "W": 28, "O": 32}, TINY, priority=1),
    # pooling and other bandwidth-bound kernels (>= 80% of HBM bandwidth)
    LayerCase("maxpool3x3_s2_c64_112", "pool",
              _net("return maxpool(x, 3, stride=2, pad=1)"),
              lambda x, p: F.max_pool2d(x, 3, 2, 1), {"N": 32, "C": 64, "H": 112, "W": 112},
              TINY, bandwidth_bound=True, dtypes=NO_DOT, priority=0),
    LayerCase("avgpool2_c128_56", "pool", _net("return avgpool(x, 2)"),
              lambda x, p: F.avg_pool2d(x, 2), {"N": 32, "C": 128, "H": 56, "W": 56}, TINY,
              bandwidth_bound=True, dtypes=NO_DOT, priority=1),
    LayerCase("lppool2_p2_c128_56", "pool", _net("return lppool(x, 2, p=2)"),
              lambda x, p: F.lp_pool2d(x, 2, 2), {"N": 32, "C": 128, "H": 56, "W": 56}, TINY,
              bandwidth_bound=True, dtypes=NO_DOT, priority=2),
    LayerCase("wavgpool3_s2_c64_56", "pool", _net("return wavgpool(x, 3, sigma=1.0, stride=2)"),
              wavg_reference(3, 1.0, 2), {"N": 32, "C": 64, "H": 56, "W": 56}, TINY,
              baseline="depthwise conv2d with a Gaussian", bandwidth_bound=True, dtypes=NO_DOT,
              priority=2),
    LayerCase("global_avgpool_c512_7", "pool", _net("return avgpool(x, output=1)"),
              lambda x, p: F.adaptive_avg_pool2d(x, 1), {"N": 256, "C": 512, "H": 7, "W": 7},
              TINY, bandwidth_bound=True, dtypes=NO_DOT, priority=2),
    LayerCase("maxout2_c128_56", "pool", _net("return maxout(x, pieces=2)"),
              maxout_reference(2), {"N": 32, "C": 128, "H": 56, "W": 56}, TINY,
              baseline="reshape + amax", bandwidth_bound=True, dtypes=NO_DOT, priority=2),
    LayerCase("softmax_channels_c1000", "pool", _net("return softmax(x)"),
              lambda x, p: torch.softmax(x, dim=1), {"N": 256, "C": 1000, "H": 1, "W": 1},
              TINY, bandwidth_bound=True, dtypes=NO_DOT, priority=2),
]


BY_NAME = {case.name: case for case in CASES}


# -- the example nets ---------------------------------------------------------------------------

# GPU sizes of the example nets' size symbols, per file (N everywhere): a
# training batch at the resolution each example is written for.
EXAMPLE_SIZES = {
    "alexnet.cdsl": {"N": 64},
    "autoencoder.cdsl": {"N": 32, "H": 64, "W": 64},
    "digits.cdsl": {"N": 256},
    "faces_local.cdsl": {"N": 64},
    "gabor_frontend.cdsl": {"N": 32, "H": 64, "W": 64},
    "inception.cdsl": {"N": 32, "H": 64, "W": 64},
    "kmeans_features.cdsl": {"N": 32, "H": 64, "W": 64},
    "lenet5.cdsl": {"N": 256, "H": 32, "W": 32},
    "maxout.cdsl": {"N": 128, "H": 32, "W": 32},
    "random_features.cdsl": {"N": 32, "H": 64, "W": 64},
    "recurrent_labels.cdsl": {"N": 16, "H": 64, "W": 64},
    "separable_blur.cdsl": {"N": 32, "H": 64, "W": 64},
    "skeleton_1d.cdsl": {"N": 64, "T": 128},
    "spectrogram_2d.cdsl": {"N": 64, "T": 128},
    "tdnn_audio.cdsl": {"N": 64, "T": 1600},
    "tiled.cdsl": {"N": 64, "H": 32, "W": 32, "T": 256},
    "video_3d.cdsl": {"N": 8, "T": 16, "H": 56, "W": 56},
    "volumetric_3d.cdsl": {"N": 4, "D": 32, "H": 32, "W": 32},
}
# Tiny sizes for the CPU smoke run (those of tests/test_examples.py where it has them).
EXAMPLE_SMOKE = {"N": 1, "H": 16, "W": 16, "T": 24, "D": 8}
EXAMPLE_SMOKE_PER_FILE = {"tdnn_audio.cdsl": {"T": 200}, "tiled.cdsl": {"T": 33},
                          "lenet5.cdsl": {"H": 20, "W": 24}}


def example_sizes(path_name: str, symbols, smoke: bool) -> dict:
    if smoke:
        found = {**EXAMPLE_SMOKE, **EXAMPLE_SMOKE_PER_FILE.get(path_name, {})}
    else:
        found = {"N": 32, "H": 64, "W": 64, "T": 128, "D": 32, **EXAMPLE_SIZES.get(path_name, {})}
    return {s: found[s] for s in symbols if s in found}
