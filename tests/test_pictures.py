"""Kernel pictures (convdsl.pictures, `convdsl draw`) and the IR as SVG (`convdsl ir --format svg`).

The PNGs are decoded here with an independent decoder (zlib, struct, all five
PNG row filters) and every pixel is compared with the kernel values it draws,
normalized by the test's own formula."""
from __future__ import annotations

import math
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

import convdsl
from convdsl import pictures
from convdsl.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GABOR = EXAMPLES / "gabor_frontend.cdsl"
WHITE = 255  # the border value


# -- an independent PNG decoder ---------------------------------------------------------------

def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def decode_png(data: bytes) -> list[list[int]]:
    """8-bit grayscale PNG → rows of pixel values; checks the signature and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert (depth, color, interlace) == (8, 0, 0), "8-bit grayscale, not interlaced"
    raw = zlib.decompress(idat)
    assert len(raw) == height * (width + 1)
    rows, previous = [], [0] * width
    for y in range(height):
        line = raw[y * (width + 1):(y + 1) * (width + 1)]
        kind, row = line[0], list(line[1:])
        for x in range(width):
            left = row[x - 1] if x else 0
            up, up_left = previous[x], previous[x - 1] if x else 0
            predictor = (0, left, up, (left + up) // 2, _paeth(left, up, up_left))[kind]
            row[x] = (row[x] + predictor) & 0xFF
        rows.append(row)
        previous = row
    return rows


def expected_levels(kernel: torch.Tensor) -> torch.Tensor:
    """The test's own normalization: min → 0, max → 255 over the whole kernel."""
    k = kernel.double()
    low, high = k.min(), k.max()
    if high == low:
        return torch.full_like(k, 128.0)
    return ((k - low) / (high - low) * 255).round()


def tile(rows, row: int, column: int, height: int, width: int, scale: int) -> torch.Tensor:
    """The kernel pixels of the tile at (row, column), one value per kernel entry."""
    top, left = row * (height * scale + 1) + 1, column * (width * scale + 1) + 1
    block = torch.tensor([r[left:left + width * scale] for r in rows[top:top + height * scale]],
                         dtype=torch.float64)
    values = block[::scale, ::scale]
    # Upscaling is nearest neighbour: every pixel of a kernel entry's square is the same.
    assert torch.equal(block, values.repeat_interleave(scale, 0).repeat_interleave(scale, 1))
    return values


def compile_net(path, name):
    torch.manual_seed(0)
    return convdsl.compile(path, net=name, backend="torch")


# -- the encoder ------------------------------------------------------------------------------

def test_png_round_trip():
    image = torch.randint(0, 256, (5, 7), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    assert decode_png(pictures.encode_png(image)) == image.tolist()


def test_png_rejects_non_images():
    with pytest.raises(ValueError):
        pictures.encode_png(torch.zeros(3, 3))  # float, not uint8


def test_png_reads_back_with_pillow(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    image = torch.arange(60, dtype=torch.uint8).reshape(6, 10) * 4
    pictures.write_png(tmp_path / "a.png", image)
    with image_module.open(tmp_path / "a.png") as read:
        assert read.mode == "L" and read.size == (10, 6)
        assert list(read.getdata()) == image.flatten().tolist()


# -- the Gabor and edge banks of examples/gabor_frontend.cdsl ---------------------------------

def test_gabor_bank_every_pixel(tmp_path):
    net = compile_net(GABOR, "GaborNet")
    weight = net.state_dict()["simple.weight"]  # [16, 1, 7, 7]: 4 orientations x 2 x 2 phases
    grid = pictures.draw_layer(net, "simple", tmp_path / "gabor.png")
    rows = decode_png((tmp_path / "gabor.png").read_bytes())
    scale = 32 // 7
    assert (grid.rows, grid.columns, grid.scale) == (4, 4, scale)
    side = 4 * (7 * scale + 1) + 1
    assert len(rows) == side and all(len(r) == side for r in rows)
    for i in range(16):
        drawn = tile(rows, i // 4, i % 4, 7, 7, scale)
        torch.testing.assert_close(drawn, expected_levels(weight[i, 0]), atol=1, rtol=0)
        assert drawn.min() == 0 and drawn.max() == 255
    # The 1-pixel borders: the first row and column, and every line between tiles.
    lines = [k * (7 * scale + 1) for k in range(5)]
    assert all(rows[y][x] == WHITE for y in lines for x in range(side))
    assert all(rows[y][x] == WHITE for x in lines for y in range(side))


def test_edge_bank_fills_a_near_square_grid(tmp_path):
    net = compile_net(GABOR, "EdgeNet")
    weight = net.state_dict()["e.weight"]  # depthwise, 3 channels x 4 orientations: [12, 1, 3, 3]
    grid = pictures.draw_layer(net, "e", tmp_path / "edges.png", scale=5)
    rows = decode_png((tmp_path / "edges.png").read_bytes())
    assert (grid.rows, grid.columns) == (3, 4)
    for i in range(12):
        drawn = tile(rows, i // 4, i % 4, 3, 3, 5)
        torch.testing.assert_close(drawn, expected_levels(weight[i, 0]), atol=1, rtol=0)


def test_multichannel_kernels_are_tiled_per_channel(tmp_path):
    net = compile_net(GABOR, "GaborNet")
    weight = net.state_dict()["h.weight"]  # [16, 8, 3, 3]
    grid = pictures.draw_layer(net, "h", tmp_path / "h.png", scale=2)
    rows = decode_png((tmp_path / "h.png").read_bytes())
    assert (grid.rows, grid.columns, grid.channel_mode) == (16, 8, "tiles")
    assert grid.tiles_per_kernel == 8
    for i in (0, 5, 15):
        levels = expected_levels(weight[i])  # one normalization across the kernel's channels
        for c in range(8):
            drawn = tile(rows, i, c, 3, 3, 2)
            torch.testing.assert_close(drawn, levels[c], atol=1, rtol=0)


def test_channel_mean_mode(tmp_path):
    net = compile_net(GABOR, "GaborNet")
    weight = net.state_dict()["h.weight"]
    grid = pictures.draw_layer(net, "h", tmp_path / "mean.png", channels="mean", scale=3)
    rows = decode_png((tmp_path / "mean.png").read_bytes())
    assert (grid.rows, grid.columns, grid.channel_mode) == (4, 4, "mean")
    for i in range(16):
        drawn = tile(rows, i // 4, i % 4, 3, 3, 3)
        torch.testing.assert_close(drawn, expected_levels(weight[i].mean(0)), atol=1, rtol=0)


def test_many_channels_default_to_the_mean():
    kernels = torch.randn(4, 17, 3, 3)
    assert pictures.kernel_grid(kernels).channel_mode == "mean"
    assert pictures.kernel_grid(kernels[:, :16]).channel_mode == "tiles"


def test_constant_kernel_is_mid_gray():
    grid = pictures.kernel_grid(torch.ones(1, 1, 2, 2), scale=1)
    assert grid.image.tolist() == [[255, 255, 255, 255], [255, 128, 128, 255],
                                   [255, 128, 128, 255], [255, 255, 255, 255]]


def test_separable_layer_draws_the_outer_product():
    net = compile_net(EXAMPLES / "separable_blur.cdsl", "SeparableNet")
    state = net.state_dict()
    full = torch.einsum("oia,oib->oiab", state["h.weight_0"], state["h.weight_1"])
    torch.testing.assert_close(pictures.layer_kernels(net, "h"), full)


def test_one_and_three_dimensional_kernels():
    tdnn = compile_net(EXAMPLES / "tdnn_audio.cdsl", "WaveformTDNN")
    grid = pictures.kernel_grid(pictures.layer_kernels(tdnn, "h"), scale=2)  # [16, 1, 9]
    assert (grid.tile_height, grid.tile_width, grid.rows, grid.columns) == (1, 9, 4, 4)
    video = compile_net(EXAMPLES / "video_3d.cdsl", "VideoClassifier")
    kernels = pictures.layer_kernels(video, video_first_layer(video))
    grid = pictures.kernel_grid(kernels, scale=1)
    out, channels, depth = kernels.shape[:3]
    assert grid.columns == channels * depth and grid.rows == out


def video_first_layer(net) -> str:
    return next(n.layer for n in net._graphs["parsed"].nodes() if n.op == "conv")


def test_tiled_layer_draws_each_tile():
    net = compile_net(EXAMPLES / "tiled.cdsl", "TiledNet")
    weight = net.state_dict()["h.weight"]  # [2, 2, 16, 1, 3, 3]
    kernels = pictures.layer_kernels(net, "h")
    assert kernels.shape == (64, 1, 3, 3)
    torch.testing.assert_close(kernels[16 * 3 + 5], weight[1, 1, 5])


# -- errors -----------------------------------------------------------------------------------

def test_unknown_layer_lists_the_drawable_ones():
    net = compile_net(GABOR, "GaborNet")
    with pytest.raises(convdsl.ConvDSLError, match=r"no layer 'nope'.*h, simple"):
        pictures.layer_kernels(net, "nope")


def test_dense_and_local_layers_are_refused():
    net = compile_net(GABOR, "GaborNet")
    with pytest.raises(convdsl.ConvDSLError, match="'dense' layer"):
        pictures.layer_kernels(net, "dense")
    faces = compile_net(EXAMPLES / "faces_local.cdsl", "FaceLocal")
    with pytest.raises(convdsl.ConvDSLError, match="locally connected"):
        pictures.layer_kernels(faces, "l4")


def test_unfitted_kmeans_layer_is_refused():
    net = compile_net(EXAMPLES / "digits.cdsl", "DigitsKMeans")
    with pytest.raises(convdsl.ConvDSLError, match="init=kmeans.*not fitted"):
        pictures.layer_kernels(net, "h")


# -- the command line -------------------------------------------------------------------------

def test_cli_draw_writes_the_gabor_bank(tmp_path, capsys):
    out = tmp_path / "bank.png"
    code = cli_main(["draw", str(GABOR), "--net", "GaborNet", "--layer", "simple", "-o", str(out)])
    assert code == 0
    assert "4x4 grid of 7x7 tiles, scale 4, 117x117 px" in capsys.readouterr().out
    net = compile_net(GABOR, "GaborNet")
    rows = decode_png(out.read_bytes())
    torch.testing.assert_close(tile(rows, 1, 2, 7, 7, 4),
                               expected_levels(net.state_dict()["simple.weight"][6, 0]),
                               atol=1, rtol=0)


def test_cli_draw_loads_a_state_dict(tmp_path, capsys):
    net = compile_net(EXAMPLES / "digits.cdsl", "DigitsLeNet")
    state = net.state_dict()
    state["h.weight"] = torch.arange(16 * 9, dtype=torch.float32).reshape(16, 1, 3, 3)
    torch.save(state, tmp_path / "state.pt")
    out = tmp_path / "h.png"
    code = cli_main(["draw", str(EXAMPLES / "digits.cdsl"), "--net", "DigitsLeNet", "--layer", "h",
                     "--state", str(tmp_path / "state.pt"), "-o", str(out), "--scale", "1"])
    assert code == 0, capsys.readouterr().err
    rows = decode_png(out.read_bytes())
    ramp = [[0, 32, 64], [96, 128, 159], [191, 223, 255]]  # 0..8 scaled to 0..255
    assert tile(rows, 0, 0, 3, 3, 1).tolist() == ramp


def test_cli_draw_fits_kmeans_layers(tmp_path, capsys):
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "data.pt")
    out = tmp_path / "centroids.png"
    code = cli_main(["draw", str(EXAMPLES / "digits.cdsl"), "--net", "DigitsKMeans",
                     "--layer", "h", "--fit", str(tmp_path / "data.pt"), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = decode_png(out.read_bytes())
    # The same fit in Python (seeded, deterministic) gives the kernels drawn.
    net = compile_net(EXAMPLES / "digits.cdsl", "DigitsKMeans")
    from convdsl.kmeans import fit_kmeans_layers
    fit_kmeans_layers(net, x)
    weight = net.state_dict()["h.weight"]
    scale, columns = 32 // 3, math.ceil(math.sqrt(32))
    for i in (0, 13, 31):
        drawn = tile(rows, i // columns, i % columns, 3, 3, scale)
        torch.testing.assert_close(drawn, expected_levels(weight[i, 0]), atol=1, rtol=0)


@pytest.mark.parametrize("argv,message", [
    (["--layer", "h", "--state", "missing.pt"], "not found"),
    (["--layer", "nope"], "no layer 'nope'"),
    (["--layer", "h", "--scale", "0"], "--scale must be >= 1"),
    (["--layer", "h"], "not fitted"),
])
def test_cli_draw_errors(tmp_path, capsys, argv, message):
    code = cli_main(["draw", str(EXAMPLES / "digits.cdsl"), "--net", "DigitsKMeans",
                     "-o", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err


def test_cli_draw_state_for_another_net(tmp_path, capsys):
    torch.save(compile_net(GABOR, "GaborNet").state_dict(), tmp_path / "gabor.pt")
    code = cli_main(["draw", str(EXAMPLES / "digits.cdsl"), "--net", "DigitsLeNet", "--layer", "h",
                     "--state", str(tmp_path / "gabor.pt"), "-o", str(tmp_path / "x.png")])
    assert code == 1 and "does not fit net DigitsLeNet" in capsys.readouterr().err


# -- the IR as SVG ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_ir_as_svg(capsys):
    code = cli_main(["ir", str(EXAMPLES / "lenet5.cdsl"), "--net", "LeNet5", "--format", "svg"])
    out = capsys.readouterr().out
    assert code == 0
    assert "<svg" in out and out.rstrip().endswith("</svg>")
    assert "conv" in out  # the op labels of the dot output made it into the drawing


def test_ir_as_svg_without_graphviz(capsys, monkeypatch):
    monkeypatch.setattr(pictures.shutil, "which", lambda name: None)
    code = cli_main(["ir", str(EXAMPLES / "lenet5.cdsl"), "--net", "LeNet5", "--format", "svg"])
    err = capsys.readouterr().err
    assert code == 1
    assert "Graphviz 'dot' not found; install graphviz" in err and "Traceback" not in err
