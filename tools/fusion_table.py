"""The optimizer's savings on every example net, from the cost model:
kernel launches and global-memory bytes per inference and per training step,
without and with the optimizer. Writes the markdown table that docs/fusion.md
includes (python tools/fusion_table.py > docs/fusion_table.md)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import convdsl
from convdsl.cost import compare, saving
from convdsl.errors import ConvDSLWarning

# Sizes per file (others: N=8 and 32 for every spatial symbol).
SIZES = {
    "tdnn_audio.cdsl": {"T": 16000, "F": 40},
    "skeleton_1d.cdsl": {"T": 64},
    "spectrogram_2d.cdsl": {"F": 64, "T": 128},
    "video_3d.cdsl": {"T": 8, "H": 32, "W": 32},
    "volumetric_3d.cdsl": {"D": 16, "H": 32, "W": 32},
    "tiled.cdsl": {"T": 256},
}


def rows():
    for path in sorted((ROOT / "examples").glob("*.cdsl")):
        program = convdsl.compiler.load_program(path)
        for name in program.nets:
            sizes = {"N": 8, **SIZES.get(path.name, {})}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvDSLWarning)
                result = compare(path, name, sizes)
            before, after = result["unoptimized"]["totals"], result["optimized"]["totals"]
            yield path.name, name, before, after


def main() -> None:
    print("| file | net | inference kernels | inference MB | saved | training-step kernels "
          "| training-step MB | saved |")
    print("|---|---|---|---|---|---|---|---|")
    totals = [0, 0, 0, 0]
    for file, name, before, after in rows():
        bi, ai, bs, as_ = before["inference"], after["inference"], before["step"], after["step"]
        totals[0] += bi.bytes
        totals[1] += ai.bytes
        totals[2] += bs.bytes
        totals[3] += as_.bytes
        print(f"| {file} | {name} | {bi.kernels} → {ai.kernels} | {bi.bytes / 1e6:.2f} → "
              f"{ai.bytes / 1e6:.2f} | {saving(bi.bytes, ai.bytes)} | {bs.kernels} → "
              f"{as_.kernels} | {bs.bytes / 1e6:.2f} → {as_.bytes / 1e6:.2f} | "
              f"{saving(bs.bytes, as_.bytes)} |", flush=True)
    print(f"| all | | | {totals[0] / 1e6:.1f} → {totals[1] / 1e6:.1f} | "
          f"{saving(totals[0], totals[1])} | | {totals[2] / 1e6:.1f} → {totals[3] / 1e6:.1f} | "
          f"{saving(totals[2], totals[3])} |")


if __name__ == "__main__":
    main()
