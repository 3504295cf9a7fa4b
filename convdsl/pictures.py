"""Pictures of a net: a layer's kernels as a PNG image grid, and the IR as SVG.

The PNG encoder is our own (zlib + struct, 8-bit grayscale), so drawing needs
no imaging library. The SVG comes from Graphviz's `dot`, when it is installed.

How a layer's kernels become a grid (`kernel_grid`):
- The weight's first axis gives the kernels: a conv's output channels (for a
  `deconv`, whose weight is stored [in, out, k...], its input channels). A
  separable layer's kernel is the outer product of its 1-D factors; a tiled
  layer's kernels are drawn tile by tile.
- Each kernel is normalized on its own: its smallest value is black (0), its
  largest white (255), a constant kernel mid-gray (128).
- A kernel with several input channels is drawn channel by channel (one row
  of tiles per kernel, one tile per input channel; a 3-D kernel adds one tile
  per depth slice) when it has at most `MAX_CHANNEL_TILES` tiles, else as the
  mean over its input channels. `channels="tiles"` or `"mean"` forces either.
- Kernel pixels are upscaled `scale` times (nearest neighbour); tiles are
  separated and surrounded by 1-pixel borders of value `border`.
"""
from __future__ import annotations

import math
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConvDSLError

MAX_CHANNEL_TILES = 16
TARGET_TILE_PIXELS = 32  # the default scale makes a tile about this many pixels on its long side
BORDER = 255
CHANNEL_MODES = ("auto", "tiles", "mean")
_CONV_OPS = ("conv", "depthwise", "deconv", "tiled")


# -- PNG -------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def encode_png(image: torch.Tensor) -> bytes:
    """An 8-bit grayscale PNG of a [height, width] uint8 tensor."""
    if image.dim() != 2 or image.dtype != torch.uint8:
        raise ValueError(f"encode_png takes a [height, width] uint8 tensor, got "
                         f"{image.dtype} {list(image.shape)}")
    height, width = image.shape
    if height < 1 or width < 1:
        raise ValueError("encode_png: the image is empty")
    # Each scanline starts with its filter type; 0 (none) keeps the encoder trivial.
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), image.cpu()], dim=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, gray, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.contiguous().numpy().tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_png(path, image: torch.Tensor) -> None:
    Path(path).write_bytes(encode_png(image))


# -- kernels → image -------------------------------------------------------------------------

@dataclass
class Grid:
    """What `kernel_grid` drew: the image and how it is laid out."""

    image: torch.Tensor  # [height, width] uint8
    rows: int
    columns: int
    tile_height: int  # kernel pixels, before scaling
    tile_width: int
    scale: int
    channel_mode: str  # "tiles" (one tile per input channel) or "mean"
    tiles_per_kernel: int  # > 1: kernel i is row i, one tile per input channel (and depth slice)


def _normalized(kernels: torch.Tensor) -> torch.Tensor:
    """Each kernel (first axis) mapped to 0..255 on its own range."""
    flat = kernels.reshape(kernels.shape[0], -1).to(torch.float64)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(1e-300) * 255.0,
                         torch.full_like(flat, 128.0))
    return scaled.round().to(torch.uint8).reshape(kernels.shape)


def _as_tiles(kernels: torch.Tensor, channels: str) -> tuple[torch.Tensor, str]:
    """[out, in, k...] → ([out, tiles, tile_h, tile_w], mode)."""
    if kernels.dim() < 3 or kernels.dim() > 5:
        raise ValueError(f"kernel_grid draws [out, in, k...] kernels of 1 to 3 spatial dims, "
                         f"got shape {list(kernels.shape)}")
    out, inputs = kernels.shape[:2]
    if kernels.dim() == 3:  # 1-D: a one-pixel-high strip
        kernels = kernels.unsqueeze(2)
    depth = kernels.shape[2] if kernels.dim() == 5 else 1
    mode = channels
    if mode == "auto":
        mode = "tiles" if inputs * depth <= MAX_CHANNEL_TILES else "mean"
    if mode == "mean":
        kernels = kernels.mean(dim=1, keepdim=True)
    tile_h, tile_w = kernels.shape[-2:]
    return kernels.reshape(out, -1, tile_h, tile_w), mode


def kernel_grid(kernels: torch.Tensor, *, channels: str = "auto", scale: int | None = None,
                border: int = BORDER) -> Grid:
    """Draw [out, in, k...] kernels (1-3 spatial dims) as a grayscale grid; see the module doc.

    With one tile per kernel the kernels fill a near-square grid row by row;
    with several (channel tiles), kernel i is row i and its tiles the columns."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {', '.join(CHANNEL_MODES)}, got {channels!r}")
    tiles, mode = _as_tiles(kernels.detach().cpu(), channels)
    out, per_kernel, tile_h, tile_w = tiles.shape
    if scale is None:
        scale = max(1, TARGET_TILE_PIXELS // max(tile_h, tile_w))
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pixels = _normalized(tiles)
    if per_kernel == 1:
        columns = math.ceil(math.sqrt(out))
        rows = math.ceil(out / columns)
        cells = [(i // columns, i % columns, pixels[i, 0]) for i in range(out)]
    else:
        rows, columns = out, per_kernel
        cells = [(i, c, pixels[i, c]) for i in range(out) for c in range(per_kernel)]
    cell_h, cell_w = tile_h * scale + 1, tile_w * scale + 1
    image = torch.full((rows * cell_h + 1, columns * cell_w + 1), border, dtype=torch.uint8)
    for row, column, tile in cells:
        top, left = row * cell_h + 1, column * cell_w + 1
        big = tile.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        image[top:top + tile_h * scale, left:left + tile_w * scale] = big
    return Grid(image, rows, columns, tile_h, tile_w, scale, mode, per_kernel)


# -- a net's layer → kernels -----------------------------------------------------------------

def layer_kernels(net, layer: str) -> torch.Tensor:
    """A layer's kernels as [kernels, in, k...] (see the module doc); clear errors otherwise."""
    from .module import _lookup
    from .torch_ops.conv import separable_kernel

    # The parsed graph: its ops are the program's own (optimization fuses and renames them).
    graph = net._graphs["parsed"]
    nodes = [n for n in graph.nodes() if n.layer == layer and n.params]
    drawable = sorted({n.layer for n in graph.nodes()
                       if n.op in _CONV_OPS and any(r.startswith("weight") for r in n.params)})
    if not nodes:
        known = ", ".join(drawable) or "none"
        raise ConvDSLError(f"net {graph.name} has no layer '{layer}' with kernels "
                           f"(layers with kernels: {known})")
    node = nodes[0]
    weights = {role: name for role, name in node.params.items() if role.startswith("weight")}
    if node.op not in _CONV_OPS or not weights:
        kind = "locally connected layer (a kernel per output position)" if node.op == "local" \
            else f"'{node.op}' layer"
        raise ConvDSLError(f"layer '{layer}' is a {kind}; draw shows the kernels of conv, "
                           f"depthwise, separable, deconv and tiled layers: "
                           f"{', '.join(drawable) or 'none in this net'}", node.span)
    if layer in net._kmeans_pending:
        raise ConvDSLError(f"layer '{layer}' has init=kmeans and is not fitted yet: fit it on "
                           f"training data first (net.fit_features, or --fit / --state)",
                           node.span)
    with torch.no_grad():
        if "weight" in weights:
            kernel = _lookup(net, weights["weight"]).detach().float()
        else:  # separable: weight_0, weight_1, ... are the 1-D factors
            factors = [_lookup(net, weights[f"weight_{i}"]).detach().float()
                       for i in range(len(weights))]
            kernel = separable_kernel(factors)
        if node.op == "tiled":  # [tiles..., out, in, k...] → tile-major kernels
            d = len(node.attrs["kernel"])
            kernel = kernel.reshape((-1,) + tuple(kernel.shape[d + 1:]))
    return kernel


def draw_layer(net, layer: str, path, *, channels: str = "auto", scale: int | None = None,
               border: int = BORDER) -> Grid:
    """Write layer `layer`'s kernels of a compiled net as a PNG grid; returns the Grid."""
    grid = kernel_grid(layer_kernels(net, layer), channels=channels, scale=scale, border=border)
    write_png(path, grid.image)
    return grid


# -- IR → SVG --------------------------------------------------------------------------------

def dot_to_svg(dot_source: str) -> str:
    """Render Graphviz dot text as SVG with the `dot` program."""
    dot = shutil.which("dot")
    if dot is None:
        raise ConvDSLError("Graphviz 'dot' not found; install graphviz (e.g. apt-get install "
                           "graphviz) or use --format dot")
    done = subprocess.run([dot, "-Tsvg"], input=dot_source, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


# -- the `convdsl draw` command ---------------------------------------------------------------

def _load(path, what: str):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvDSLError(f"{what} file '{path}' not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConvDSLError(f"cannot read {what} file '{path}' (torch.save output expected): "
                           f"{reason}") from None


def load_state(net, path) -> None:
    """Load a state_dict saved with torch.save(net.state_dict(), path), checking its keys."""
    state = _load(path, "state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvDSLError(f"state file '{path}' does not hold a state_dict")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ConvDSLError(f"state file '{path}' does not fit net {net.name} ("
                           + "; ".join(problems) + ")")
    net.load_state_dict(state)


def load_fit_data(path) -> torch.Tensor | tuple:
    """Training inputs for fit_features: a tensor, or a list/tuple of them (one per net input)."""
    data = _load(path, "fit data")
    if isinstance(data, (list, tuple)) and data and all(isinstance(t, torch.Tensor) for t in data):
        return tuple(data)
    if not isinstance(data, torch.Tensor):
        raise ConvDSLError(f"fit data file '{path}' must hold a tensor (or a tuple of tensors, "
                           f"one per net input), got {type(data).__name__}")
    return data


def draw_command(net, layer: str, output, *, state=None, fit=None, channels: str = "auto",
                 scale: int | None = None) -> str:
    """What `convdsl draw` does after compiling: weights, fitting, drawing; returns a summary."""
    from .kmeans import fit_kmeans_layers

    if state is not None:
        load_state(net, state)
    if fit is not None:
        fit_kmeans_layers(net, load_fit_data(fit))
    grid = draw_layer(net, layer, output, channels=channels, scale=scale)
    height, width = grid.image.shape
    if grid.tiles_per_kernel > 1:
        layout = ", a row per kernel, a tile per input channel"
    elif grid.channel_mode == "mean":
        layout = ", each the mean over its input channels"
    else:
        layout = ""
    return (f"wrote {output}: layer {layer} of net {net.name}, {grid.rows}x{grid.columns} grid "
            f"of {grid.tile_height}x{grid.tile_width} tiles{layout}, scale {grid.scale}, "
            f"{width}x{height} px")
