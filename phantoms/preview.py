"""Maximum-intensity projections of a volume, with a mask overlaid, as one PNG.

    python -m phantoms.preview IMAGE [--label MASK] --png OUT [--scale S]

Three panels side by side, each the MIP along one axis: axial (along z, rows y, columns x),
coronal (along y, rows z with superior up, columns x) and sagittal (along x, rows z with
superior up, columns y). Panels keep physical proportions (resampled to the finest spacing),
are enlarged by `scale` and separated by GAP pixels; the mask's own MIP is blended in red.
Works for any image SimpleITK reads, e.g. the masks written by the inference container.
With ``--truth``, the mask is drawn against a reference instead: found vessel in yellow,
false positives in red, missed vessel in blue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

GAP = 4
OVERLAY_RGB = np.array([255.0, 40.0, 40.0], dtype=np.float32)
OVERLAY_ALPHA = 0.45
ERROR_RGB = {
    "found": np.array([255.0, 220.0, 40.0], dtype=np.float32),
    "false": OVERLAY_RGB,
    "missed": np.array([60.0, 120.0, 255.0], dtype=np.float32),
}
"""Colours of a mask drawn against a reference; on a projection ray that holds several, found
vessel wins, then false positives, so that what lies apart from the vessels stands out."""


def _panel_size(rows: int, cols: int, row_mm: float, col_mm: float, unit: float, scale: float):
    """(width, height) in pixels of a panel drawn at `unit` mm per pixel, times `scale`."""
    return (
        max(1, int(round(cols * col_mm / unit * scale))),
        max(1, int(round(rows * row_mm / unit * scale))),
    )


def mip_panels(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal maximum-intensity projections of a (z, y, x) array,
    with superior (high z) at the top of the coronal and sagittal panels."""
    return [volume.max(axis=0), volume.max(axis=1)[::-1], volume.max(axis=2)[::-1]]


def overlays(mask: np.ndarray | None, truth: np.ndarray | None) -> list[list[tuple]]:
    """Per panel, the (projected region, colour) pairs to blend over the grey MIP, in order:
    the mask in red, or with a truth its found, false and missed voxels (:data:`ERROR_RGB`)."""
    if mask is None:
        return [[] for _ in range(3)]
    if truth is None:
        return [[(m, OVERLAY_RGB)] for m in mip_panels(mask > 0)]
    mask, truth = mask > 0, truth > 0
    parts = (mask & truth, mask & ~truth, truth & ~mask)
    panels = []
    for found, false, missed in zip(*(mip_panels(p) for p in parts), strict=True):
        false, missed = false & ~found, missed & ~found & ~false
        panels.append(list(zip((found, false, missed), ERROR_RGB.values(), strict=True)))
    return panels


def render_preview(
    image: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    mask: np.ndarray | None = None,
    scale: float = 1.0,
    truth: np.ndarray | None = None,
) -> Image.Image:
    """RGB picture of the three MIPs of `image` (z, y, x), the mask's MIPs in red on top, or
    with `truth` its found, false and missed voxels in :data:`ERROR_RGB`.

    Grey levels map [p0.5, p99.9] of the projections to [0, 255].
    """
    sx, sy, sz = spacing_xyz
    unit = min(spacing_xyz)
    mips = mip_panels(image.astype(np.float32, copy=False))
    lo, hi = np.percentile(np.concatenate([m.ravel() for m in mips]), [0.5, 99.9])
    row_col_mm = [(sy, sx), (sz, sx), (sz, sy)]
    panels = []
    for mip, regions, (row_mm, col_mm) in zip(mips, overlays(mask, truth), row_col_mm, strict=True):
        grey = np.clip((mip - lo) / max(hi - lo, 1e-6), 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for region, colour in regions:
            alpha = OVERLAY_ALPHA * region[..., None].astype(np.float32)
            rgb = rgb * (1 - alpha) + colour * alpha
        size = _panel_size(*mip.shape, row_mm, col_mm, unit, scale)
        panels.append(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
    width = sum(p.width for p in panels) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in panels)), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, name in zip(panels, ("axial", "coronal", "sagittal"), strict=True):
        canvas.paste(panel, (x, 0))
        draw.text((x + 3, 2), name, fill=(255, 255, 0))
        x += panel.width + GAP
    return canvas


def auto_scale(shape: tuple[int, ...]) -> int:
    """Integer enlargement that makes small volumes at least ~256 pixels tall."""
    return max(1, 256 // max(shape))


def read_mask(path: Path, image: sitk.Image) -> np.ndarray:
    """The mask at `path` as an array; ValueError if its size differs from `image`'s."""
    label = sitk.ReadImage(str(path))
    if label.GetSize() != image.GetSize():
        raise ValueError(
            f"{path}: size {label.GetSize()} differs from the image's {image.GetSize()}"
        )
    return sitk.GetArrayFromImage(label)


def save_preview(
    image_path: Path,
    png_path: Path,
    label_path: Path | None = None,
    scale: float | None = None,
    truth_path: Path | None = None,
) -> tuple[int, int]:
    """Read `image_path` (and `label_path`, drawn against `truth_path` if given), write the MIP
    picture to `png_path`; returns its (width, height). Raises ValueError if a mask's size
    differs from the image's."""
    png_path = Path(png_path)
    image = sitk.ReadImage(str(image_path))
    volume = sitk.GetArrayViewFromImage(image)
    mask = None if label_path is None else read_mask(label_path, image)
    truth = None if truth_path is None else read_mask(truth_path, image)
    scale = auto_scale(volume.shape) if scale is None else scale
    picture = render_preview(volume, image.GetSpacing(), mask, scale, truth)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(png_path)
    return picture.size


def mip_panel(
    image_path: Path, masks: list[tuple[str, Path]], png_path: Path, truth: Path | None = None
) -> Path:
    """One row of MIPs per mask (e.g. truth and two models' predictions) over the same image,
    each row titled, stacked into one PNG; masks other than `truth` are drawn against it."""
    image = sitk.ReadImage(str(image_path))
    volume = sitk.GetArrayViewFromImage(image)
    reference = None if truth is None else read_mask(truth, image)
    rows = []
    for title, path in masks:
        is_truth = reference is not None and path == truth  # drawn plain, read once
        mask = reference if is_truth else read_mask(path, image)
        against = None if is_truth else reference
        row = render_preview(volume, image.GetSpacing(), mask, auto_scale(volume.shape), against)
        ImageDraw.Draw(row).text((3, row.height - 14), title, fill=(255, 255, 0))
        rows.append(row)
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height + GAP for r in rows)))
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + GAP
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png_path)
    return Path(png_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m phantoms.preview",
        description="Maximum-intensity projections (axial, coronal, sagittal) with a mask.",
    )
    parser.add_argument("image", type=Path, help="volume to project (any SimpleITK format)")
    parser.add_argument("--label", type=Path, help="mask to overlay in red (same size)")
    parser.add_argument(
        "--truth",
        type=Path,
        help="reference mask: draw --label's found (yellow), false (red), missed (blue) voxels",
    )
    parser.add_argument("--png", type=Path, required=True, help="picture to write")
    parser.add_argument(
        "--scale", type=float, help="enlargement (default: enough for ~256 pixels of height)"
    )
    args = parser.parse_args(argv)
    if args.truth is not None and args.label is None:
        print("error: --truth needs --label, the mask to draw against it", file=sys.stderr)
        return 2
    for path in (args.image, args.label, args.truth):
        if path is not None and not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    try:
        width, height = save_preview(args.image, args.png, args.label, args.scale, args.truth)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    print(f"{args.png} ({width}x{height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
