"""The self-contained ``report.html`` of one analysed scan (SPEC §10), and the parts other pages reuse.

One file that opens anywhere without a network: the CSS and the JavaScript are inline, every image is a
base64 PNG data URI, and a Content-Security-Policy forbids the browser every fetch, so a copied report
can never call out and never shows a broken image. It holds the research-decision-support disclaimer,
the scan summary (geometry, bundle, mode; the report dict has no patient identifiers and nothing here
adds any — not even the scan's file path), a summary table with one row per nodule, and per nodule the
axial / coronal / sagittal crops with the mask contour, an axial slice scroller, its measurements and
its Lung-RADS v2022 baseline category.

Images. Each view is sampled on a world-axis-aligned square of ``size_mm`` (64 mm; report.html widens it
to 1.5 × a larger nodule's max 3D diameter) around a point, at square pixels, from the scan's voxels
through its direction matrix (`common.io.CTVolume.world_to_voxel`) with linear interpolation: anisotropic
spacing, flipped and oblique scans all come out with the true physical aspect ratio, in the radiological
convention (axial and coronal: patient right on the image's left; axial: anterior up; coronal and
sagittal: superior up; sagittal: anterior on the left). The lung window is level −600 / width 1500 HU, in
128 gray levels. The nodule's mask contour (orange) is the 0.5 level of its linearly resampled mask, other
nodules' contours are cyan, the white bar is 10 mm. The scroller's frames lie on the scan's own slices
(the world z of each slice through the nodule centre), over the mask's extent ± 5 mm, at most `MAX_FRAMES`
of them.

Reusable pieces (``followup.html`` is built from them):

    Crop(volume, labels, centre_world_mm, size_mm=64, pixels=192)   # one region, sampled on demand
        .image(plane, label=None, offset_mm=0.0) -> PIL.Image         # "axial" | "coronal" | "sagittal"
        .sample(plane) -> HU array; .mask(plane, label) -> [0, 1] array
    render_view(hu, nodule_mask=None, other_mask=None, pixel_mm=None) -> PIL.Image   # 2D array → view
    crop_data_uri(volume, labels, centre_world_mm, plane, label=None, ...) -> str   # one view as a data URI
    axial_frames(crop, volume, label, axial_slice=None) -> (list[Frame], start)    # the scroller's frames
    scroller_html(frames, start, title=...) -> str     # <figure class="scroller"> (needs SCROLLER_JS)
    view_html(src, plane, title=...) -> str            # one static view with orientation letters
    png_data_uri(image) -> str; figure_data_uri(matplotlib_figure) -> str   # e.g. a size-over-time plot
    page_html(title, body_html) -> str   # the whole document: CSP, STYLE, disclaimer, SCROLLER_JS
    esc(value) -> str                    # HTML-escape anything placed into the page

`write_report_html` is `page_html` around the summary and one section per nodule.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure

from common.atomic import write_text
from common.io import index_to_world_matrix
from lungcad import DISCLAIMER

if TYPE_CHECKING:
    from common.io import CTVolume

__all__ = [
    "LUNG_WINDOW_HU",
    "MAX_FRAMES",
    "SCROLLER_JS",
    "STYLE",
    "Crop",
    "Frame",
    "axial_frames",
    "crop_data_uri",
    "esc",
    "figure_data_uri",
    "page_html",
    "png_data_uri",
    "render_view",
    "scroller_html",
    "view_html",
    "write_report_html",
]

#: Lung window, level −600 HU / width 1500 HU.
LUNG_WINDOW_HU = (-1350.0, 150.0)
#: Value outside the scan (black in any window).
OUTSIDE_HU = -2000.0
#: Slices of one nodule's scroller at most (a longer extent is shown with a stride).
MAX_FRAMES = 32
#: The scroller shows the nodule's mask extent plus this margin on each side.
FRAME_MARGIN_MM = 5.0
#: The scale bar drawn in every view.
SCALE_BAR_MM = 10.0

# The PNGs are palette images: 128 gray levels (11.8 HU each in the lung window, below CT noise; a third
# smaller than 252 levels), then the overlay colours.
_GRAY_LEVELS = 128
_NODULE, _OTHER, _BAR = _GRAY_LEVELS, _GRAY_LEVELS + 1, _GRAY_LEVELS + 2
_PALETTE = [v for g in range(_GRAY_LEVELS) for v in (round(g * 255 / (_GRAY_LEVELS - 1)),) * 3]
_PALETTE += [255, 165, 0, 0, 200, 255, 255, 255, 255]

# World axes (x, y, z) spanning each plane: (right on screen, down on screen). LPS: +x patient left,
# +y posterior, +z superior.
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}
# Orientation letters at the (left, right, top, bottom) edges of each plane.
_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def esc(value: Any) -> str:
    """HTML-escape any value for text or a quoted attribute."""
    return html.escape(str(value), quote=True)


# ------------------------------------------------------------------------------------------------ images


def png_data_uri(image: Image.Image | np.ndarray) -> str:
    """A PNG data URI of a Pillow image or a uint8 array (gray (H, W) or RGB (H, W, 3))."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(figure: Any, dpi: int = 96) -> str:
    """A PNG data URI of a matplotlib figure (e.g. a size-over-time plot); the figure is not closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class Crop:
    """A world-axis-aligned square region of `size_mm` around a point of a scan, sampled on demand.

    The scan's voxels are read once (the index box that holds the region's cube); every view is then
    a plane through it at `pixels` × `pixels` square pixels, whatever the scan's spacing and direction.
    """

    def __init__(
        self,
        volume: CTVolume,
        labels: np.ndarray | None,
        centre_world_mm: Sequence[float],
        size_mm: float = 64.0,
        pixels: int = 192,
        window_hu: tuple[float, float] = LUNG_WINDOW_HU,
    ) -> None:
        if labels is not None and labels.shape != volume.shape:
            raise ValueError(f"labels of shape {labels.shape} do not match the scan's {volume.shape}")
        self.volume = volume
        self.centre = np.asarray(centre_world_mm, dtype=np.float64).reshape(3)
        self.size_mm = float(size_mm)
        self.pixels = int(pixels)
        self.pixel_mm = self.size_mm / self.pixels
        self.window_hu = window_hu
        half = self.size_mm / 2 + 2 * max(volume.spacing)
        corners = self.centre + np.array(np.meshgrid(*[[-half, half]] * 3)).reshape(3, -1).T
        index = volume.world_to_voxel(corners)
        lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, np.asarray(volume.shape) - 1)
        hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 1, np.asarray(volume.shape))
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.offset = lo.astype(np.float64)
        self.hu = volume.array[box].astype(np.float32)
        self.labels = None if labels is None else np.asarray(labels[box])
        self._masks: dict[tuple[int | None, bool], np.ndarray | None] = {}

    def _resample(self, block: np.ndarray, plane: str, offsets_mm: np.ndarray, cval: float) -> np.ndarray:
        """`block` on the plane at each of the equally spaced `offsets_mm` along its normal: (n, P, P).

        One `scipy.ndimage.affine_transform` per call: output (frame, row, column) → block index.
        """
        if plane not in _PLANES:
            raise ValueError(f"unknown plane {plane!r}; use one of {', '.join(_PLANES)}")
        right, down = (np.asarray(a) for a in _PLANES[plane])
        normal = np.abs(np.cross(right, down))
        offsets_mm = np.atleast_1d(np.asarray(offsets_mm, dtype=np.float64))
        step = float(offsets_mm[1] - offsets_mm[0]) if offsets_mm.size > 1 else 0.0
        if not np.allclose(np.diff(offsets_mm), step, atol=1e-3):
            raise ValueError("the offsets of one resampling must be equally spaced")
        # world offset (x, y, z) → index offset (z, y, x)
        to_index = np.linalg.inv(index_to_world_matrix(self.volume.spacing, self.volume.direction))[::-1]
        corner = self.centre + offsets_mm[0] * normal - (self.pixels - 1) / 2 * self.pixel_mm * (right + down)
        offset = to_index @ (corner - np.asarray(self.volume.origin)) - self.offset
        matrix = np.column_stack(
            [to_index @ normal * step, to_index @ down * self.pixel_mm, to_index @ right * self.pixel_mm]
        )
        return ndimage.affine_transform(
            block,
            matrix,
            offset,
            output_shape=(offsets_mm.size, self.pixels, self.pixels),
            order=1,
            mode="constant",
            cval=cval,
            prefilter=False,
        )

    def _mask_block(self, label: int | None, others: bool) -> np.ndarray | None:
        """`label`'s mask (or every other label's) in the block as float32, None when empty; cached."""
        key = (label, others)
        if key not in self._masks:
            block = None
            if self.labels is not None and (label is not None or others):
                binary = (self.labels > 0) & (self.labels != label) if others else self.labels == label
                block = binary.astype(np.float32) if binary.any() else None
            self._masks[key] = block
        return self._masks[key]

    def sample(self, plane: str, offset_mm: float = 0.0) -> np.ndarray:
        """HU of the plane (pixels × pixels), shifted `offset_mm` along its normal (+z, +y or +x)."""
        return self._resample(self.hu, plane, np.array([offset_mm]), OUTSIDE_HU)[0]

    def mask(self, plane: str, label: int | None, offset_mm: float = 0.0, others: bool = False) -> np.ndarray:
        """The linearly resampled mask of `label` (or, with `others`, of every other label) in [0, 1]."""
        block = self._mask_block(label, others)
        if block is None:
            return np.zeros((self.pixels, self.pixels), np.float32)
        return self._resample(block, plane, np.array([offset_mm]), 0.0)[0]

    def images(
        self, plane: str, label: int | None = None, offsets_mm: Sequence[float] = (0.0,)
    ) -> list[Image.Image]:
        """The plane at equally spaced offsets along its normal, rendered by `render_view`."""
        offsets = np.asarray(offsets_mm, dtype=np.float64)
        hu = self._resample(self.hu, plane, offsets, OUTSIDE_HU)
        masks = []
        for others in (False, True):
            block = self._mask_block(label, others)
            masks.append(None if block is None else self._resample(block, plane, offsets, 0.0))
        return [
            render_view(
                hu[k],
                None if masks[0] is None else masks[0][k],
                None if masks[1] is None else masks[1][k],
                self.pixel_mm,
                self.window_hu,
            )
            for k in range(offsets.size)
        ]

    def image(self, plane: str, label: int | None = None, offset_mm: float = 0.0) -> Image.Image:
        """One plane rendered by `render_view` (`label`'s contour orange, other labels cyan)."""
        return self.images(plane, label, [offset_mm])[0]


def render_view(
    hu: np.ndarray,
    nodule_mask: np.ndarray | None = None,
    other_mask: np.ndarray | None = None,
    pixel_mm: float | None = None,
    window_hu: tuple[float, float] = LUNG_WINDOW_HU,
) -> Image.Image:
    """A 2D HU image in the window as a palette image: mask contours (0.5 level) and a 10 mm bar.

    `nodule_mask` is drawn orange, `other_mask` cyan (both in [0, 1], same shape as `hu`); the bar
    needs the square pixel size `pixel_mm`.
    """
    lo, hi = window_hu
    gray = np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0) * (_GRAY_LEVELS - 1)
    image = Image.fromarray(np.rint(gray).astype(np.uint8))
    image.putpalette(_PALETTE)
    draw = ImageDraw.Draw(image)
    for colour, mask in ((_OTHER, other_mask), (_NODULE, nodule_mask)):
        if mask is None or float(np.max(mask)) < 0.5:
            continue
        for contour in measure.find_contours(np.asarray(mask, dtype=np.float32), 0.5):
            draw.line([(float(c), float(r)) for r, c in contour], fill=colour, width=1)
    if pixel_mm:
        y = image.height - 8
        bar = [(6, y), (6 + SCALE_BAR_MM / pixel_mm, y)]
        draw.line(bar, fill=0, width=5)  # a black rim keeps it visible on soft tissue
        draw.line(bar, fill=_BAR, width=3)
    return image


def crop_data_uri(
    volume: CTVolume,
    labels: np.ndarray | None,
    centre_world_mm: Sequence[float],
    plane: str,
    label: int | None = None,
    size_mm: float = 64.0,
    pixels: int = 192,
    offset_mm: float = 0.0,
) -> str:
    """One view around a world point as a PNG data URI, with `label`'s contour (see `Crop`)."""
    return png_data_uri(Crop(volume, labels, centre_world_mm, size_mm, pixels).image(plane, label, offset_mm))


@dataclass(frozen=True)
class Frame:
    """One image of a scroller: its data URI and the caption shown with it."""

    src: str
    caption: str


def _slice_axis(volume: CTVolume) -> int:
    """The array axis (0 = z, 1 = y, 2 = x) whose direction is closest to world z: the scan's slices."""
    column = int(np.argmax(np.abs(volume.direction[2, :])))  # index axis in (x, y, z) order
    return 2 - column


def axial_frames(
    crop: Crop, volume: CTVolume, label: int | None, axial_slice: int | None = None
) -> tuple[list[Frame], int]:
    """The scroller's axial frames through the crop's centre, on the scan's own slices.

    The frames span `label`'s mask extent ± `FRAME_MARGIN_MM` (without a mask: the margin around the
    centre), inferior to superior, at most `MAX_FRAMES` (a stride beyond). Returns the frames and the
    position of `axial_slice` (the slice of largest mask area), or of the centre, among them.
    """
    axis = _slice_axis(volume)
    centre_index = volume.world_to_voxel(crop.centre)[0]
    step_mm = abs(
        float(volume.voxel_to_world(np.eye(3)[axis])[0, 2] - volume.voxel_to_world(np.zeros(3))[0, 2])
    )
    margin = max(1, math.ceil(FRAME_MARGIN_MM / max(step_mm, 1e-6)))
    middle = int(np.clip(round(centre_index[axis]), 0, volume.shape[axis] - 1))
    first = last = middle
    if crop.labels is not None and label is not None:
        present = np.flatnonzero(np.any(crop.labels == label, axis=tuple(a for a in range(3) if a != axis)))
        if present.size:
            first = int(present[0] + crop.offset[axis])
            last = int(present[-1] + crop.offset[axis])
    # within the scan and the voxels the crop holds
    first = max(0, int(crop.offset[axis]), first - margin)
    last = min(volume.shape[axis] - 1, int(crop.offset[axis]) + crop.hu.shape[axis] - 1, last + margin)
    slices = np.arange(first, last + 1)
    focus = axial_slice if axial_slice is not None and first <= axial_slice <= last else middle
    if slices.size > MAX_FRAMES:
        stride = math.ceil(slices.size / MAX_FRAMES)
        slices = slices[(slices - focus) % stride == 0]
    points = np.repeat(centre_index[None, :], slices.size, axis=0)
    points[:, axis] = slices
    z_world = volume.voxel_to_world(points)[:, 2]
    order = np.argsort(z_world)
    images = crop.images("axial", label, z_world[order] - crop.centre[2])
    frames = [
        Frame(
            png_data_uri(image),
            f"slice {int(slices[k])}, z {z_world[k]:.1f} mm"
            + (" (largest extent)" if slices[k] == axial_slice else ""),
        )
        for image, k in zip(images, order)
    ]
    start = int(np.flatnonzero(slices[order] == focus)[0])
    return frames, start


# ------------------------------------------------------------------------------------------------- HTML

STYLE = """
:root { color-scheme: light; --ink: #1b1f24; --muted: #57606a; --line: #d0d7de; --warn: #fff4d6; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 1rem 1.25rem 3rem; color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 1.5rem; margin: .2rem 0 .6rem; } h2 { font-size: 1.2rem; margin: 1.6rem 0 .6rem; }
.disclaimer { background: var(--warn); border: 1px solid #e3c26b; border-radius: 6px; padding: .6rem .8rem;
  font-weight: 600; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; margin: .6rem 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .4rem 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; } td.num { text-align: right; }
.badge { display: inline-block; min-width: 2.2em; padding: .05rem .45rem; border-radius: 4px;
  text-align: center; font-weight: 700; background: #e7ecf0; }
.badge.cat-3 { background: #fff1b8; } .badge.cat-4A, .badge.cat-4B, .badge.cat-4X { background: #ffd2c2; }
section.nodule { border-top: 2px solid var(--line); margin-top: 1.5rem; }
.views { display: flex; flex-wrap: wrap; gap: 1rem; margin: .5rem 0; }
figure.view { margin: 0; width: 192px; outline: none; }
figure.view:focus-visible .frame { box-shadow: 0 0 0 3px #0969da; }
.frame { position: relative; width: 192px; height: 192px; background: #000; }
.frame img { display: block; width: 192px; height: 192px; }
.frame img[hidden] { display: none; }
.ori { position: absolute; color: #ffd866; font: 700 12px/1 monospace; text-shadow: 0 0 2px #000; }
.ori.l { left: 3px; top: 50%; } .ori.r { right: 3px; top: 50%; }
.ori.t { top: 3px; left: 50%; } .ori.b { bottom: 14px; left: 50%; }
figure.view input[type=range] { width: 100%; margin: .3rem 0 0; }
figcaption { font-size: .82rem; color: var(--muted); }
.details { display: flex; flex-wrap: wrap; gap: 1.5rem; }
.category p { margin: .25rem 0; max-width: 42rem; }
footer { margin-top: 2rem; color: var(--muted); font-size: .85rem; }
@media print { .frame img[hidden] { display: none; } input[type=range] { display: none; } }
"""

SCROLLER_JS = """
(function () {
  "use strict";
  function setup(fig) {
    var imgs = fig.querySelectorAll("img.slice");
    var range = fig.querySelector("input[type=range]");
    var caption = fig.querySelector(".slice-caption");
    function show(i) {
      i = Math.max(0, Math.min(imgs.length - 1, i));
      for (var k = 0; k < imgs.length; k++) { imgs[k].hidden = k !== i; }
      range.value = String(i);
      fig.setAttribute("data-slice", String(i));
      caption.textContent = imgs[i].getAttribute("data-caption");
    }
    range.addEventListener("input", function () { show(Number(range.value)); });
    fig.addEventListener("keydown", function (ev) {
      if (ev.target === range) { return; }  /* a focused range moves with the arrows by itself */
      var step = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 5, PageDown: -5}[ev.key];
      if (step) { show(Number(range.value) + step); ev.preventDefault(); }
    });
    show(Number(range.value));
  }
  var figs = document.querySelectorAll("figure.scroller");
  for (var n = 0; n < figs.length; n++) { setup(figs[n]); }
})();
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _letters(plane: str) -> str:
    left, right, top, bottom = _LETTERS[plane]
    return (
        f'<span class="ori l">{left}</span><span class="ori r">{right}</span>'
        f'<span class="ori t">{top}</span><span class="ori b">{bottom}</span>'
    )


def view_html(src: str, plane: str, title: str = "") -> str:
    """A static view: the image with its orientation letters and a caption."""
    caption = esc(title or plane)
    return (
        f'<figure class="view" data-plane="{esc(plane)}"><div class="frame">'
        f'<img src="{esc(src)}" alt="{caption}">{_letters(plane)}</div>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def scroller_html(frames: Sequence[Frame], start: int, title: str = "axial", plane: str = "axial") -> str:
    """A slice scroller: the frames stacked as preloaded images, one shown, a range input and arrow keys.

    Works with `SCROLLER_JS` on the page (`page_html` includes it); without JavaScript the start frame
    shows. The figure's ``data-slice`` attribute holds the shown frame's position.
    """
    if not frames:
        raise ValueError("a scroller needs at least one frame")
    start = int(np.clip(start, 0, len(frames) - 1))
    images = "".join(
        f'<img class="slice" src="{esc(f.src)}" data-caption="{esc(f.caption)}" alt="{esc(title)}: '
        f'{esc(f.caption)}"{"" if k == start else " hidden"}>'
        for k, f in enumerate(frames)
    )
    return (
        f'<figure class="view scroller" tabindex="0" data-plane="{esc(plane)}" data-slice="{start}" '
        f'data-frames="{len(frames)}"><div class="frame">{images}{_letters(plane)}</div>'
        f'<input type="range" min="0" max="{len(frames) - 1}" step="1" value="{start}" '
        f'aria-label="{esc(title)} slice">'
        f'<figcaption>{esc(title)}: <span class="slice-caption">{esc(frames[start].caption)}</span><br>'
        f"slider or arrow keys: inferior ← → superior</figcaption></figure>"
    )


def page_html(title: str, body_html: str) -> str:
    """The whole self-contained document: CSP, style, the disclaimer at the top, body, scroller script."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>"
        f'<p class="disclaimer" role="note">{esc(DISCLAIMER)}</p>\n{body_html}\n'
        f"<script>{SCROLLER_JS}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------- report


def _num(value: Any, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return esc(value)
    if not math.isfinite(number):
        return "—"
    return esc(f"{number:.{digits}f}{unit}")


def _triple(values: Any, digits: int = 1) -> str:
    if values is None:
        return "—"
    return ", ".join(_num(v, digits) for v in values)


def _badge(category: dict[str, Any] | None) -> str:
    name = str((category or {}).get("category", "—"))
    safe_class = "".join(ch for ch in name if ch.isalnum())
    return f'<span class="badge cat-{safe_class}">{esc(name)}</span>'


def _type_text(m: dict[str, Any]) -> str:
    text = esc(m.get("type", "—"))
    if m.get("solid_component_mm") is not None:
        text += f" (solid part {_num(m['solid_component_mm'])} mm)"
    return text


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    """A definition list; the values are HTML already escaped by the caller."""
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _scan_header(report: dict[str, Any]) -> str:
    scan = report.get("scan", {})
    bundle = report.get("bundle") or {}
    generator = report.get("generator") or {}
    timings = report.get("timings_s") or {}
    rows = [
        ("Scan", esc(scan.get("id", "—"))),
        ("Format", esc(scan.get("format", "—"))),
        ("Matrix (z × y × x)", " × ".join(esc(v) for v in scan.get("shape_zyx", [])) or "—"),
        ("Spacing (x, y, z)", _triple(scan.get("spacing_xyz"), 3) + " mm"),
        ("Mode", esc(report.get("mode", "—"))),
        ("Nodules reported", esc(len(report.get("nodules", [])))),
    ]
    scalars = [(k, v) for k, v in bundle.items() if isinstance(v, (str, int, float, bool)) or v is None]
    if scalars:
        rows.append(("Bundle", "; ".join(f"{esc(k)}: <code>{esc(v)}</code>" for k, v in scalars)))
    if timings:
        total = sum(float(v) for v in timings.values() if isinstance(v, (int, float)))
        steps = ", ".join(f"{esc(k)} {_num(v)}" for k, v in timings.items())
        rows.append(("Time", f"{_num(total)} s ({steps})"))
    rows.append(
        (
            "Generator",
            f"{esc(generator.get('name', 'lungcad'))} {esc(generator.get('version', ''))}, "
            f"report schema {esc(report.get('schema_version', '—'))}",
        )
    )
    return "<header><h1>lungcad report</h1>" + _facts(rows) + "</header>"


def _scan_category(report: dict[str, Any]) -> str:
    category = report.get("scan_category") or {}
    return (
        f'<p class="scan-category">Scan category (Lung-RADS v2022 baseline): {_badge(category)} '
        f"{esc(category.get('descriptor', ''))}. {esc(category.get('management', ''))}</p>"
    )


def _summary(report: dict[str, Any]) -> str:
    head = (
        "<thead><tr><th>#</th><th>Centre x, y, z (world mm)</th><th>Mean diameter (mm)</th>"
        "<th>Volume (mm³)</th><th>Type</th><th>Malignancy probability</th><th>Lung-RADS</th>"
        "<th>Detection score</th></tr></thead>"
    )
    rows = []
    for nodule in report.get("nodules", []):
        m = nodule.get("measurements", {})
        index = esc(nodule.get("index", "?"))
        score = nodule.get("detection_score")
        rows.append(
            f'<tr class="nodule-row" data-index="{index}"><td><a href="#nodule-{index}">{index}</a></td>'
            f"<td>{_triple(m.get('center_world_mm'))}</td>"
            f'<td class="num">{_num(m.get("mean_diameter_mm"))}</td>'
            f'<td class="num">{_num(m.get("volume_mm3"), 0)}</td><td>{_type_text(m)}</td>'
            f'<td class="num">{_num(nodule.get("malignancy_probability"), 2)}</td>'
            f"<td>{_badge(nodule.get('category'))}</td>"
            f'<td class="num">{_num(score, 2) if score is not None else esc(nodule.get("source", "given"))}</td>'
            "</tr>"
        )
    if not rows:
        rows.append('<tr class="empty"><td colspan="8">No nodule reported.</td></tr>')
    return (
        '<section id="summary"><h2>Summary</h2>'
        + _scan_category(report)
        + f'<table class="summary">{head}<tbody>{"".join(rows)}</tbody></table></section>'
    )


def _nodule_section(
    nodule: dict[str, Any], volume: CTVolume, labels: np.ndarray, size_mm: float, pixels: int
) -> str:
    m = nodule.get("measurements", {})
    index = esc(nodule.get("index", "?"))
    label = int(nodule.get("label", nodule.get("index", 0)))
    centre = m.get("center_world_mm")
    views = ""
    if centre is not None:
        # a mass larger than the field keeps a margin around it
        field_mm = max(size_mm, 1.5 * float(m.get("max_3d_diameter_mm") or 0.0))
        crop = Crop(volume, labels, centre, field_mm, pixels)
        frames, start = axial_frames(crop, volume, label, m.get("axial_slice"))
        views = (
            '<div class="views">'
            + scroller_html(frames, start, title="Axial")
            + view_html(png_data_uri(crop.image("coronal", label)), "coronal", "Coronal, through the centre")
            + view_html(
                png_data_uri(crop.image("sagittal", label)), "sagittal", "Sagittal, through the centre"
            )
            + "</div>"
        )
    score = nodule.get("detection_score")
    rows = [
        ("Centre (world mm, x, y, z)", _triple(centre)),
        ("Centre (voxel i, j, k)", _triple(m.get("center_voxel_xyz"))),
        ("Volume", _num(m.get("volume_mm3"), 0, " mm³")),
        ("Long / short axis", f"{_num(m.get('long_axis_mm'))} / {_num(m.get('short_axis_mm'))} mm"),
        ("Mean diameter", _num(m.get("mean_diameter_mm"), 1, " mm")),
        ("Max 3D diameter", _num(m.get("max_3d_diameter_mm"), 1, " mm")),
        ("Axial slice of largest extent", esc(m.get("axial_slice", "—"))),
        ("HU mean / max", f"{_num(m.get('mean_hu'), 0)} / {_num(m.get('max_hu'), 0)}"),
        ("Type", _type_text(m)),
        ("Solid part volume", _num(m.get("solid_volume_mm3"), 0, " mm³")),
        ("Malignancy probability", _num(nodule.get("malignancy_probability"), 2)),
        ("Detection score", _num(score, 2) if score is not None else "— (position given)"),
        ("Source", esc(nodule.get("source", "—"))),
    ]
    if centre is not None:
        rows.append(("Views", f"{_num(field_mm, 0)} mm square, lung window"))
    category = nodule.get("category") or {}
    category_html = (
        f'<div class="category"><h3>Lung-RADS v2022 baseline {_badge(category)}</h3>'
        f"<p><strong>{esc(category.get('descriptor', ''))}</strong></p>"
        f"<p>Management: {esc(category.get('management', '—'))}</p>"
        f"<p>Rule: {esc(category.get('reason', '—'))}</p></div>"
    )
    return (
        f'<section class="nodule" id="nodule-{index}" data-label="{label}"><h2>Nodule {index}: '
        f"{_type_text(m)}, {_num(m.get('mean_diameter_mm'))} mm, Lung-RADS {_badge(category)}</h2>"
        f'{views}<div class="details">{_facts(rows)}{category_html}</div></section>'
    )


def _legend(size_mm: float) -> str:
    return (
        "<footer><p>How to read: each view is a "
        f"{_num(size_mm, 0)} mm square (wider for a larger nodule) around the nodule's centre in the lung window (level −600, width "
        "1500 HU) at its true physical aspect ratio, in the radiological convention (letters at the edges: "
        "R/L patient right/left, A/P anterior/posterior, S/I superior/inferior). Orange: this nodule's "
        "segmentation contour; cyan: other nodules; white bar: 10 mm. The axial view scrolls through the "
        "scan's own slices over the nodule's extent ± 5 mm (slider, or arrow keys once the image is "
        "clicked); it opens on the slice of largest extent, where the long and short axes were measured. "
        "Categories follow the ACR Lung-RADS v2022 baseline table from type and size only (4X needs a "
        "reader). Coordinates are the scan's own patient coordinates (LPS, as in DICOM and ITK).</p></footer>"
    )


def write_report_html(
    report: dict[str, Any],
    volume: CTVolume,
    labels: np.ndarray,
    path: str | Path,
    size_mm: float = 64.0,
    pixels: int = 192,
) -> Path:
    """Write the self-contained ``report.html`` of one scan (see the module docstring) and return its path.

    Args:
        report: the report.json dict (contract layout); every string from it is escaped.
        volume: the scan as read (original geometry).
        labels: (z, y, x) integer labels on the scan's grid, nodule k's mask = its ``label`` value.
        path: the file to write (atomically).
        size_mm, pixels: each view's field of view (widened to 1.5 × the nodule's max 3D diameter for a
            larger one) and its pixels per side (the page shows every view 192 px wide).
    """
    labels = np.asarray(labels)
    if labels.shape != volume.shape:
        raise ValueError(
            f"labels of shape {labels.shape} do not match the scan's {volume.shape}; "
            "pass the label volume on the scan's own grid"
        )
    scan_id = (report.get("scan") or {}).get("id", "scan")
    body = [_scan_header(report), "<main>", _summary(report)]
    body += [_nodule_section(n, volume, labels, size_mm, pixels) for n in report.get("nodules", [])]
    body += ["</main>", _legend(size_mm)]
    return write_text(path, page_html(f"lungcad report: {scan_id}", "\n".join(body)))
