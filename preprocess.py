"""A person's picture -> an MNIST-style 28x28 digit (image_to_mnist, first half), and a picture of a whole
number -> its digits (read_number, second half). Each half's steps come in the order they run.

Used by predict.py, app.py and demo.py, never by training (training reads MNIST itself, see data_loader.py).
The classifier is passed in, so this module never loads a model.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from data_loader import MNIST_MEAN, MNIST_STD
from common import first_line

# ------------------------------------------------------------------------------------------------------------
# User pictures -> MNIST: image_to_mnist() and its helpers
#
# MNIST digits are white ink on black, scaled to fit a 20x20 box with the aspect ratio kept, anti-aliased and
# placed in a 28x28 field so that the centre of mass lands on the middle pixel. People send dark ink on
# paper, photos with shadows, JPEG noise, transparent drawing-app exports, a small digit on a big canvas.
# The steps below undo those one at a time:
#   open (any Pillow format, first frame, EXIF orientation) -> ink-bright grey (alpha or polarity)
#   -> flatten the paper (fitted surface) -> find the digit (connected parts, specks dropped)
#   -> thicken hairlines -> fit 20x20 with anti-aliasing -> centre of mass at the middle -> normalise.
# Pillow decodes and resamples (its Lanczos filter anti-aliases a shrinking digit; ndimage.zoom does not);
# scipy.ndimage labels the parts, measures them, dilates and finds the centre of mass. Written here because
# no library does them: the robust spread of the paper (_spread), the paper surface (_fit_background), which
# parts make the digit (_digit_region) and the stroke width (_stroke_width).
# ------------------------------------------------------------------------------------------------------------

WORK_MAX = 1024      # longest side the pixels are worked on at; bigger pictures are box-reduced first
ANALYSIS_MAX = 128   # longest side of the copy used to find paper, noise and the digit
DIGIT_BOX = 20       # MNIST digits fit a 20x20 box ...
FIELD = 28           # ... inside a 28x28 field ...
MASS_CENTRE = 14.0   # ... with the centre of mass on pixel 14
MIN_STROKE = 0.7     # strokes thinner than this in the 20x20 box (thinner than almost every MNIST digit's) ...
TARGET_STROKE = 2.0  # ... are thickened to about the MNIST median before resampling
MIN_SIDE = 10        # ink less than this across (working pixels) is too small to be a digit; MNIST's are 20 tall
DOT_WIDTH = 0.33     # a mark without a hole whose strokes are this wide against its longest side, filling ...
DOT_FILL = 0.65      # ... this share of its box, its short side at least ...
DOT_ROUND = 0.8      # ... this share of its long side, is a dot, not a digit
DIGIT_GAP = 0.3      # ink split by empty columns this share of its height wide is two digits, when both stand ...
DIGIT_TALL = 0.5     # ... this share of its height; so is a part this tall on the digit's rows, too far to be ...
OTHER_MASS = 0.2     # ... one of its pieces, with this share of its ink (these five: docs/predict.md, "Not one digit")
EIGHT = np.ones((3, 3), bool)  # 8-connectivity: pixels that touch at a corner are one stroke
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")


class ImageError(ValueError):
    """A picture that cannot be turned into an MNIST digit, phrased in one line for the person who sent it."""


class NoDigitError(ImageError):
    """The picture was read, but it holds no digit: a blank page, a flat colour, noise only, a dot, a speck."""


class SeveralDigitsError(ImageError):
    """The picture holds several digits side by side (a number: read_number reads it), not one."""


def open_image(source):
    """A file path, PIL image or array -> a fully decoded PIL image, first frame, EXIF orientation applied.

    Raises ImageError with one line for a missing, empty, unreadable, truncated or non-image file.
    """
    if isinstance(source, Image.Image):
        return _upright(_decoded(source))
    if isinstance(source, np.ndarray):
        arr = source.astype(np.float32) if source.dtype.kind == "f" else source
        arr = arr.astype(np.uint8) * 255 if arr.dtype == bool else arr
        try:
            return Image.fromarray(arr, "F") if arr.dtype == np.float32 and arr.ndim == 2 else Image.fromarray(arr)
        except (TypeError, ValueError, KeyError) as err:
            raise ImageError(f"an array of shape {source.shape} and dtype {source.dtype} is not a picture") from err
    path = Path(source)
    try:
        if path.is_dir():
            raise ImageError("is a folder, not a picture")
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        opened = Image.open(path)
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except PermissionError:
        raise ImageError("cannot be read (permission denied)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:  # refused at open, from its header alone
        raise ImageError(f"too large to decode safely ({first_line(err, 160)})") from None
    except OSError as err:
        raise ImageError(f"cannot be opened ({err.strerror or first_line(err, 160)})") from None
    with opened:
        return _upright(_decoded(opened))


def _decoded(img):
    """Decode a PIL image's first frame now, so a damaged file fails here with one line."""
    img.info.setdefault("full_size", img.size)  # boxes of a number are given in the file's own pixels
    try:
        if img.format == "JPEG" and max(img.size) > WORK_MAX:
            # decode big JPEGs at 1/2, 1/4 or 1/8 scale straight from the file: several times faster
            shrink = WORK_MAX / max(img.size)
            img.draft("L" if img.mode in ("L", "RGB") else None,
                      (max(1, int(img.width * shrink)), max(1, int(img.height * shrink))))
        img.seek(0)  # an animated GIF, APNG or multi-page TIFF: the first frame
        img.load()
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large to decode safely ({first_line(err, 160)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        # Pillow reports truncation as OSError, some broken headers as SyntaxError or ValueError
        raise ImageError(f"damaged or truncated image ({first_line(err, 160)})") from None
    return img


def _upright(img):
    """Apply the EXIF orientation tag (phone photos are stored sideways with one); broken EXIF is ignored."""
    full, stored = img.info.get("full_size", img.size), img.size
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed tag says nothing reliable about orientation: use the pixels as stored
        return img
    img.info["full_size"] = full[::-1] if img.size != stored else full  # turned by 90 degrees: swapped
    return img


def _reduce_to(img, max_side):
    """Box-average a PIL image by an integer factor so its longest side is at most max_side: (image, factor)."""
    factor = -(-max(img.size) // max_side)
    return (img.reduce(factor) if factor > 1 else img), factor


def _to_float(img):
    """A single-channel PIL image (L, or F already in [0, 1]) as a float32 array in [0, 1]."""
    arr = np.asarray(img, dtype=np.float32)
    return arr if img.mode == "F" else arr / 255.0


def _border(arr):
    """The outer ring of an array (about 5% of the side, at least one pixel), flattened."""
    b = max(1, round(0.05 * min(arr.shape)))
    return np.concatenate([arr[:b].ravel(), arr[-b:].ravel(), arr[b:-b, :b].ravel(), arr[b:-b, -b:].ravel()])


def _spread(values):
    """Robust standard deviation (scaled median absolute deviation): JPEG noise and a few ink pixels don't move it.

    By hand rather than scipy.stats.median_abs_deviation: it is two lines, on a subsample, and scipy.stats is
    slow to import.
    """
    if values.size == 0:
        return 0.0
    values = values.ravel()[:: max(1, values.size // 4096)]  # a few thousand samples pin it down well enough
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _grey_plane(img):
    """One channel to find the ink in, at most WORK_MAX on a side: (PIL image L or F in [0, 1], ink_is_alpha).

    A picture with a transparent background (a drawing app's export) takes its ink from the alpha channel, so
    a transparent background never becomes ink whatever colour its hidden pixels have. A picture that is
    mostly opaque with transparent margins is composited over its own paper colour instead. Anything else
    becomes luminance; 16-bit and float images are scaled to [0, 1] by their bit depth.
    """
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba, _ = _reduce_to(img.convert("RGBA"), WORK_MAX)
        alpha = rgba.getchannel("A")
        small = np.asarray(_reduce_to(rgba, ANALYSIS_MAX)[0], dtype=np.float32)
        opaque = small[..., 3] > 127
        if alpha.getextrema()[0] < 230 and opaque.mean() < 0.5:
            return alpha, True  # strokes on a transparent canvas: their coverage is the ink
        paper = tuple(int(v) for v in np.median(small[opaque][:, :3], axis=0)) if opaque.any() else (255,) * 3
        return Image.alpha_composite(Image.new("RGBA", rgba.size, paper + (255,)), rgba).convert("L"), False
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float32)
        top = float(arr.max(initial=0.0))
        scale = 1.0 if img.mode == "F" and top <= 1.0 else 65535.0 if top > 255 else 255.0
        img = Image.fromarray(arr / scale, "F")
    elif img.mode != "L":
        img = img.convert("L")  # RGB, CMYK, YCbCr, 1, P: luminance
    return _reduce_to(img, WORK_MAX)[0], False


def _is_dark_on_light(flat, noise):
    """True when the ink is darker than the paper: more contrast lies below the paper than above it.

    `flat` is the picture minus its fitted paper surface, so a light gradient across a photo counts for neither;
    `noise` is the paper's own spread, so grain and JPEG noise count for neither either.
    """
    margin = max(0.08, 3.0 * noise)
    return bool(np.clip(-flat - margin, 0, None).sum() > np.clip(flat - margin, 0, None).sum())


def _surface(coef, rows, cols, shape):
    """The fitted paper surface at the given (fractional) coarse-pixel centres: a (len(rows), len(cols)) array."""
    y = (np.asarray(rows, np.float32) / shape[0] * 2 - 1)[:, None]
    x = (np.asarray(cols, np.float32) / shape[1] * 2 - 1)[None, :]
    c = [float(v) for v in coef]
    return (c[0] + c[1] * y + c[2] * x + c[3] * y * y + c[4] * y * x + c[5] * x * x).astype(np.float32) \
        + np.zeros((y.shape[0], x.shape[1]), np.float32)


def _paper_region(coarse):
    """Where the paper is, roughly: the largest connected stretch of the picture without edges.

    Light fall-off and soft shadows change slowly, so they stay inside it; ink strokes and the sharp edge of a
    table or a page border cut it off. Starting the paper fit from here keeps a dark table edge from bending it.
    """
    # each pixel's largest step up or down to a 4-neighbour: large at an edge, small across a soft shadow
    cross = ndimage.generate_binary_structure(2, 1)
    step = np.maximum(ndimage.maximum_filter(coarse, footprint=cross, mode="nearest") - coarse,
                      coarse - ndimage.minimum_filter(coarse, footprint=cross, mode="nearest"))
    smooth = step < max(0.03, 4.0 * _spread(step))
    labels = _label_components(smooth)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax() if sizes.max() > 0 else smooth


def _fit_background(coarse):
    """The paper under the ink: a quadratic surface fitted to the coarse copy's pixels that are not ink.

    A quadratic follows the light fall-off and soft shadows of a phone photo; where nothing varies it is a
    constant. Ink is rejected on both sides (the polarity is not known yet): pixels far from the fit, above or
    below, are left out and the fit repeated. Returns (6 coefficients for _surface, noise: the robust spread
    of the paper around the fit).
    """
    hc, wc = coarse.shape
    border = _border(coarse)
    half = max(1, max(hc, wc) // 64)  # edges are found on a grid of at most 64, the surface fitted on 32
    near_paper = np.abs(coarse[::half, ::half] - np.median(border)) < max(0.05, 3.0 * _spread(border))
    background = _paper_region(coarse[::half, ::half]) & near_paper  # no edge in between, and paper-coloured
    if background.mean() < 0.2 or min(hc, wc) < 8:
        return [float(np.median(border)), 0, 0, 0, 0, 0], _spread(border)
    step = max(1, max(hc, wc) // 32 // half)
    background = background[::step, ::step]
    step *= half
    rows, cols = np.arange(0, hc, step) + 0.5, np.arange(0, wc, step) + 0.5
    coarse = coarse[::step, ::step]
    y, x = np.meshgrid(rows / hc * 2 - 1, cols / wc * 2 - 1, indexing="ij")
    basis = np.stack([np.ones_like(y), y, x, y * y, y * x, x * x], -1)
    for _ in range(3):  # fit, leave out what sticks out of the fit (ink), fit again
        b = basis[background]  # least squares by the 6x6 normal equations: lstsq's SVD is much slower here
        coef = np.linalg.solve(b.T @ b + 1e-6 * np.eye(6), b.T @ coarse[background].astype(np.float64))
        resid = coarse - _surface(coef, rows, cols, (hc, wc))
        noise = _spread(resid[background])
        keep = np.abs(resid) < max(0.03, 3.0 * noise)
        if keep.mean() < 0.2:
            break
        background = keep
    fitted = _surface(coef, rows, cols, (hc, wc))
    if float(fitted.max() - fitted.min()) < 0.03:  # no shadow worth modelling: a constant is cleaner
        return [float(np.median(coarse[background]))] + [0] * 5, noise
    return coef, noise


def _label_components(mask):
    """8-connected components of a boolean array: an int array where each part holds one label, 0 elsewhere."""
    return ndimage.label(mask, EIGHT)[0]


def _parts(mask, ink):
    """The connected parts of a mask: (labels, ids, and per part its ink mass, box y0 y1 x0 x1, and edge flag).

    Box ends y1 and x1 are inclusive. A part is edge-like when it runs along the picture's border for at least
    15% of the border's length: the table beside the page, a dark photo margin, a shadow coming in from the
    side. A digit cropped tightly touches the border only where its strokes end.
    """
    labels = _label_components(mask)
    ids = np.arange(1, labels.max(initial=0) + 1)
    mass = ndimage.sum_labels(ink, labels, ids)
    boxes = [(y.start, y.stop - 1, x.start, x.stop - 1) for y, x in ndimage.find_objects(labels)]
    y0, y1, x0, x1 = np.array(boxes, int).reshape(-1, 4).T
    h, w = mask.shape
    border = np.ones((h, w), bool)
    border[1:-1, 1:-1] = False
    edge = ndimage.sum_labels(border, labels, ids) >= 0.15 * 2 * (h + w)
    return labels, ids, mass, (y0, y1, x0, x1), edge


def _digit_region(ink, strong):
    """The pixels that belong to the digit: the heaviest connected part plus the parts near it or nearly as big.

    Specks of dust, JPEG blocks and a stray mark far from the digit are left out, so they neither stretch the
    bounding box nor pull the centre of mass; so are edge-like parts (see _parts). Returns a boolean mask, or
    None when there is no ink; raises SeveralDigitsError when a part left out is as big as a digit, beside it.
    """
    labels, ids, mass, (y0, y1, x0, x1), edge = _parts(strong, ink)
    if ids.size == 0:
        return None
    if not edge.all():
        mass = np.where(edge, 0.0, mass)  # edge-like parts are neither the digit nor part of it
    main = int(mass.argmax())
    kept = np.zeros(ids.size, bool)
    kept[main] = True
    box = [y0[main], y1[main], x0[main], x1[main]]
    changed = True
    while changed:  # grow the digit by the parts that sit close to it
        changed = False
        size = max(box[1] - box[0], box[3] - box[2]) + 1
        gap = np.maximum.reduce([box[0] - y1, y0 - box[1], box[2] - x1, x0 - box[3], np.zeros(ids.size, int)])
        near = (gap <= 0.25 * size + 1) & (mass >= 0.01 * mass[main])
        big = (gap <= 0.6 * size) & (mass >= 0.3 * mass[main])
        add = (near | big) & ~kept & (mass > 0)
        if add.any():
            kept |= add
            box = [min(box[0], y0[add].min()), max(box[1], y1[add].max()),
                   min(box[2], x0[add].min()), max(box[3], x1[add].max())]
            changed = True
    h, height = y1 - y0 + 1, box[1] - box[0] + 1
    beside = np.minimum(y1, box[1]) - np.maximum(y0, box[0]) + 1 >= 0.5 * np.minimum(h, height)  # the same rows
    if (~kept & beside & (h >= DIGIT_TALL * height) & (mass >= OTHER_MASS * mass[kept].sum())).any():
        raise SeveralDigitsError("several digits side by side, not one")
    return np.isin(labels, ids[kept])


def _ink_box(mask):
    """The (rows, columns) slices of the smallest box holding every True pixel of a mask; None when it has none."""
    found = ndimage.find_objects(mask.astype(np.int8))
    return found[0] if found else None


@dataclass
class DigitRegion:
    """Where _find_digit saw the digit, on a reduced copy of the picture; what _cut_digit needs to cut it out."""
    mask: np.ndarray      # bool, True on the digit, on the reduced copy
    factor: int           # the copy is the picture reduced by this factor
    paper: np.ndarray     # coefficients of the fitted paper surface (see _surface)
    sign: float           # +1 when the ink is brighter than the paper, -1 when darker
    ink_level: float      # 90th percentile of the ink's contrast against the paper
    coarse_shape: tuple   # (rows, columns) of the reduced copy


def _find_digit(plane, ink_is_alpha):
    """Where the digit is, worked out on a copy at most ANALYSIS_MAX on a side (cheap, and box-averaging calms
    the noise). Raises NoDigitError when nothing stands out from the paper.
    """
    coarse_img, factor = _reduce_to(plane, ANALYSIS_MAX)
    coarse = _to_float(coarse_img)
    coef, noise = _fit_background(coarse)
    ink = coarse - _surface(coef, np.arange(coarse.shape[0]) + 0.5, np.arange(coarse.shape[1]) + 0.5, coarse.shape)
    sign = -1.0 if not ink_is_alpha and _is_dark_on_light(ink, noise) else 1.0  # dark ink on paper: invert
    ink *= sign
    candidates = ink > 4.0 * noise + 0.02
    if candidates.sum() < 2:
        raise NoDigitError("no digit found (the picture is blank)")
    labels, ids, _, _, edge = _parts(candidates, ink)
    if edge.any() and not edge.all():  # a dark table or margin beside the page is neither the digit nor its level
        candidates &= ~np.isin(labels, ids[edge])
    ink_level = float(np.percentile(ink[candidates], 90))
    if ink_level < max(0.08, 8.0 * noise):
        raise NoDigitError("no digit found (nothing stands out from the background)")
    region = _digit_region(ink, candidates & (ink > max(0.5 * ink_level, 4.0 * noise + 0.02)))
    if region is None:
        raise NoDigitError("no digit found")
    # take in the anti-aliased rim around the strokes
    region = ndimage.binary_dilation(region, EIGHT, iterations=2 if factor == 1 else 1)
    return DigitRegion(region, factor, coef, sign, ink_level, coarse.shape)


def _cut_digit(plane, found):
    """The digit at working resolution, cropped to its ink: paper exactly 0, ink about 1 (float32 array)."""
    factor = found.factor
    rows, cols = _ink_box(found.mask)
    box = (cols.start * factor, rows.start * factor,
           min(cols.stop * factor, plane.width), min(rows.stop * factor, plane.height))
    window = _to_float(plane.crop(box))
    h, w = window.shape
    window = found.sign * (window - _surface(found.paper, (np.arange(h) + box[1] + 0.5) / factor,
                                             (np.arange(w) + box[0] + 0.5) / factor, found.coarse_shape))
    inside = found.mask[rows, cols].repeat(factor, 0).repeat(factor, 1)[:h, :w]
    paper = window[~inside]
    noise = _spread(paper) if paper.size >= 50 else 0.0
    floor = 4.0 * noise if noise > 0 else 0.5 / 255
    ink = np.where(inside, window, 0.0)
    ink_box = _ink_box(ink > floor)
    if ink_box is None:
        raise NoDigitError("no digit found")
    crop = ink[ink_box]
    strong = crop[crop > max(floor, 0.25 * found.ink_level)]
    level = float(np.percentile(strong, 90)) if strong.size else found.ink_level
    # Paper noise and the faintest JPEG ringing go to exactly 0 (MNIST's background is 0); ink goes to ~1.
    return np.clip((crop - 3.0 * noise) / max(level - 3.0 * noise, 1e-6), 0.0, 1.0).astype(np.float32)


def _one_digit(crop):
    """The cut-out digit (see _cut_digit), unless its ink is no single digit: too small, a dot, or digits with
    a wide gap between them. Raises NoDigitError with the reason, or SeveralDigitsError."""
    ink = crop > 0.5
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    if rows.size == 0:
        return crop  # faint ink only: fit_and_centre decides
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = max(h, w)
    if side < MIN_SIDE:
        raise NoDigitError("no digit found (the mark found is too small to be a digit)")
    if (_stroke_width(ink) >= DOT_WIDTH * side and ink.sum() >= DOT_FILL * h * w and min(h, w) >= DOT_ROUND * side
            and not (ndimage.binary_fill_holes(ink) & ~ink).any()):
        raise NoDigitError("no digit found (a dot: too round and solid to be a digit)")
    columns = np.split(cols, np.flatnonzero(np.diff(cols) - 1 >= DIGIT_GAP * h) + 1)
    if sum(np.ptp(np.flatnonzero(ink[:, c[0]:c[-1] + 1].any(1))) + 1 >= DIGIT_TALL * h for c in columns) > 1:
        raise SeveralDigitsError("several digits side by side, not one")
    return crop


def _stroke_width(binary):
    """Mean stroke width in pixels of a boolean image: area / half the perimeter (a long stroke: L*w / L).

    The perimeter is counted by hand, as the pixel edges between ink and not: scipy.ndimage has no perimeter.
    """
    area = binary.sum()
    if area == 0:
        return 0.0
    p = np.pad(binary, 1)
    edges = (p[1:, :] != p[:-1, :]).sum() + (p[:, 1:] != p[:, :-1]).sum()
    return float(2.0 * area / edges)


def _fit_digit_box(crop):
    """Scale the cropped digit to fit DIGIT_BOX x DIGIT_BOX, aspect ratio kept, with anti-aliasing.

    Hairlines (a 3-px brush on a 500-px canvas, a fine pen on a scan) would fade to a grey smudge at 20x20,
    so strokes thinner than MIN_STROKE in the box are first thickened by a maximum filter, at a resolution
    where they are about one pixel wide.
    """
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    img = Image.fromarray(crop.astype(np.float32), "F")
    width = _stroke_width(crop > 0.5)
    if 0 < width * scale < MIN_STROKE:
        # at `mid` (longest side) the strokes are about a pixel wide, or the digit is 3x the box if that is bigger
        mid = max(3 * DIGIT_BOX, round(max(h, w) / max(width, 1.0)))
        mid_scale = mid / max(h, w)
        if mid != max(h, w):
            img = img.resize((max(1, round(w * mid_scale)), max(1, round(h * mid_scale))),
                             Image.Resampling.BOX if mid < max(h, w) else Image.Resampling.BILINEAR)
        grow = round((TARGET_STROKE * mid / DIGIT_BOX - width * mid_scale) / 2)  # pixels on either side
        if grow > 0:
            img = Image.fromarray(ndimage.maximum_filter(np.asarray(img), size=2 * grow + 1), "F")
        scale = DIGIT_BOX / max(img.size)
        w, h = img.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img, dtype=np.float32)


def _place_by_mass(digit):
    """Paste a digit (at most 20x20) into a 28x28 field with its centre of mass on pixel 14, as MNIST did.

    The shift is a whole number of pixels, so an MNIST digit goes back to where it was, unresampled.
    """
    h, w = digit.shape
    cy, cx = ndimage.center_of_mass(digit)
    top = int(np.clip(np.floor(MASS_CENTRE - cy + 0.5), 0, FIELD - h))
    left = int(np.clip(np.floor(MASS_CENTRE - cx + 0.5), 0, FIELD - w))
    field = np.zeros((FIELD, FIELD), np.float32)
    field[top:top + h, left:left + w] = digit
    return field


def fit_and_centre(crop):
    """A digit cropped to its ink (float, paper 0, ink about 1) -> 28x28 float32 in [0, 1], as MNIST: fitted
    into 20x20 (thin strokes thickened) and centred by mass. The last two steps of image_to_mnist, which
    read_number takes for each digit too."""
    digit = np.clip(_fit_digit_box(crop), 0.0, 1.0)  # Lanczos rings a little below 0 and above 1
    if digit.sum() <= 0:
        raise NoDigitError("no digit found")
    return _place_by_mass(digit)


def image_to_mnist_pixels(source):
    """A user's picture -> a 28x28 float32 numpy array in [0, 1], white digit on black, as MNIST looks.

    source: a path, a PIL image or a numpy array. Raises ImageError (one line) for unreadable input,
    NoDigitError when the picture holds no digit and SeveralDigitsError when it holds several side by side.
    """
    plane, ink_is_alpha = _grey_plane(open_image(source))
    return fit_and_centre(_one_digit(_cut_digit(plane, _find_digit(plane, ink_is_alpha))))


def image_to_mnist(source, mean=MNIST_MEAN, std=MNIST_STD):
    """A user's picture -> a normalised float tensor (1, 28, 28), ready for a model trained on MNIST.

    Pass the checkpoint's normalization mean and std (ckpt["normalization"]); the defaults are MNIST's.
    Raises ImageError (one line): see image_to_mnist_pixels.
    """
    pixels = torch.from_numpy(image_to_mnist_pixels(source))
    return ((pixels - mean) / std).unsqueeze(0)


def mnist_to_image(tensor, mean=MNIST_MEAN, std=MNIST_STD):
    """The inverse for looking: a normalised (1, 28, 28) or (28, 28) tensor -> an 8-bit greyscale PIL image."""
    pixels = (tensor.detach().cpu().reshape(FIELD, FIELD) * std + mean).clamp(0, 1)
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy(), "L")


# ------------------------------------------------------------------------------------------------------------
# Numbers: a picture of several digits -> the digits, line by line, left to right: read_number()
#
# The same steps as image_to_mnist (open, ink-bright grey plane, fitted paper surface, ink mask, connected
# parts, fit 20x20, centre by mass in 28x28), at a resolution fit for many digits (NUMBER_MAX on a side) and
# then:
#   parts -> lines (the rows their boxes cover, top to bottom) -> the line's digit height H (median of its
#   tall parts) -> drop ruled lines and specks (judged by height against H, not by ink: a 1 has little ink),
#   keep decimal points and dashes apart -> clusters (parts that overlap or nearly touch along x) ->
#   candidate cuts in each cluster (between the parts' centres, and through parts wide enough to be two
#   touching digits: at the thin columns of their ink) -> every run of cuts is a candidate digit -> all the
#   candidates of the picture through the classifier in one batch -> per cluster, the chain of candidates
#   with the most probable reading (over-segment and recognise), with a prior on a digit's width and height
#   so that two digits are not read as one wide digit nor one digit as two slivers.
# A broken digit (a 5 with its bar apart) is one candidate covering both parts, and wins because each part
# alone is too short to be a digit. The classifier is passed in (pixels (N, 28, 28) in [0, 1] -> (N, 10)
# probabilities), so this module never loads a model.
# ------------------------------------------------------------------------------------------------------------

NUMBER_MAX = 640         # longest side the ink of a number is found at: 10 digits across still get ~40 px each
MAX_DIGITS = 64          # a picture with more than this is a page of text or noise: refused in one line
MAX_CANDIDATES = 4096    # candidate digits per picture (the batch); more means something other than a number
DOT_MIN = 0.12          # a decimal point is at least this share of the digit height both ways: the 2-4 px crumbs
                         # a broken stroke or the paper's noise leaves on the baseline are specks, not points
DOT_GAP = 0.08           # ... and it stands apart from the digits beside it by this share: the end of a 9's or
                         # a 3's tail broken off right against it is not a point (development sets, MNIST train:
                         # '9.28' for 928 at a gap of 0, '17224.30' for 1722430 at 0.07 H; none was a point)
SPECK_HEIGHT = 0.3       # parts shorter than this share of the line's digit height are not digits by themselves
PIECE_HEIGHT = 0.6       # a digit stands at least this share of it: shorter ink is a piece of one
# ... so short parts that lie together and stand PIECE_HEIGHT tall between them are one digit written faintly,
# in pieces. On the development and validation sets (MNIST train, seeds 202, 303, 505 and 606; validation
# digits, seed 404: 4,000 pictures) it changed 3 readings, all from wrong to right (a dropped 8 and a dropped 5,
# a 5 read as '-'), and none of the 1,200 test pictures.
LINE_CORE = 0.2          # a part's box, less this share at top and bottom, says which rows its line covers
CUTTABLE_WIDTH = 0.75    # a part wider than this share of the digit height may be several touching digits
# A part wider than CUT_INSIDE_WIDTH digit heights is also cut inside, at the thin columns of its ink: a 1 that
# touches its neighbour makes a part only a little wider than one digit ("19" read as a 9 had no cut to try).
# Chosen on the development sets (MNIST train, seeds 202 and 303), touching numbers read right: 0.75 (the old
# rule, CUTTABLE_WIDTH's) 83.5% / 88.5%, 0.4 84.5% / 88.5%. Lowering CUTTABLE_WIDTH itself (which also drops
# the cut between the centres of two such parts) gave 84.0% / 88.5% at 0.6 and 0.5, 84.5% / 88.5% at 0.4 and
# 84.5% / 88.0% at 0.3. The spaced, long and UCI kinds of both seeds were unchanged by all of them.
CUT_INSIDE_WIDTH = 0.4
MAX_DIGIT_WIDTH = 1.6    # no candidate digit is wider than this share of the digit height
NEAR_GAP = 0.04          # a flat stroke this close to a digit's columns (share of the height) touches it (_is_flag)
# Parts closer than this share of the digit height along x are one reading problem (a cluster). A thin 4 in two
# pieces a little apart was two clusters, so always two digits ("44000147" read "461000147"); in one cluster the
# gap is one more seam and the chain chooses. 0.12, not NEAR_GAP's 0.04, on the development sets (MNIST train,
# seeds 202 and 303, 2,400 pictures): 6 read right that were not, none read wrong that was right.
CLUSTER_GAP = 0.12
SEGMENT_COST = 2.0       # log-probability each further digit costs: a wide 0 is not two slivers read as 1s
WIDE = 1.0               # candidates wider than this share of the digit height ...
WIDE_COST = 8.0          # ... lose this much log-probability per digit height of excess width
# A cluster wider than MULTI_WIDTH digit heights and, on a line with several clusters, PAIR_RATIO times its
# median cluster, is probably touching digits: there each digit costs SEGMENT_COST_WIDE instead, and seams are
# also started at the top. Chosen on the development set (MNIST train digits, seed 101): SEGMENT_COST_WIDE 0
# took touching digits from 37% to 73% of numbers right; PAIR_RATIO under 2.2 began to split wide 0s and 2s on
# spaced lines (1.8: long 85 -> 83%, PNG 92 -> 90%), over 0.9 H left touching pairs such as "14" whole.
MULTI_WIDTH = 0.9
PAIR_RATIO = 2.2
SEGMENT_COST_WIDE = 0.0
# A seam pays SEAM_INK per pixel of full-strength ink it crosses for each SEAM_STEP it pays per pixel sideways
# (only their ratio matters: every seam crosses every row). Between digits that may well be one each (40 to 1) it
# goes a long way around ink, so it slips between digits that overlap without touching. In a cluster that is
# probably several touching digits it goes straighter (4 to 1) and cuts through the junction: the long detours
# there made seams that took a piece of the neighbour, and the classifier read those pieces as confident
# digits. Chosen on the development set (200 touching pictures from MNIST train, seed 202): ratio 40 read 50%
# of them right, 10 to 1 52%, 6.7 53%, 4 56.5%, 3 56%, 2.7 56%, 2.5 54.5%; both 40 and 4 together 55.5%.
SEAM_INK, SEAM_STEP = 20.0, 0.5
SEAM_INK_SEVERAL, SEAM_STEP_SEVERAL = 6.0, 1.5
# ... and straight vertical cuts as well, at the same places: where a stroke crosses into the neighbour's box
# (a slanted 1, the bar of a 7) every seam goes around both digits or takes a piece of one, and a straight cut
# leaves each digit whole but for a sliver of the other. Without the number judge they only added wrong
# candidates (18% of touching numbers right, 2026-12-01); with it, 78.5% / 74.5% -> 85% / 85% on the two
# development sets (MNIST train, seeds 202 and 303), the other kinds of seed 202 unchanged. So they are made
# only for a reader with a judge: number_candidates(straight=True).
# With number_judge.py's judge: its log P(one whole digit) counts JUDGE_WEIGHT in a candidate's score, and its
# reading of the digit has a share JUDGE_DIGITS of the digit probabilities (geometric mix with the classifier's).
# Chosen on 400 touching pictures from MNIST train (seeds 202 and 303): strings right, 0.5 and 0.5: 78.5% and
# 74.5%; 1 and 0.7: 75% and 76.5%; 0.5 and 0: 73% and 73.5%; no judge: 56% on seed 202.
JUDGE_WEIGHT = 0.5
JUDGE_DIGITS = 0.5


class TooManyDigitsError(ImageError):
    """More marks than any number has: a page of text, a sheet of specks. Refused before the work explodes."""


@dataclass
class ReadDigit:
    """One character of a reading: a digit "0"-"9" (or "." / "-"), its probability and its box in the picture's
    own pixels (x0, y0, x1, y1, x1 and y1 exclusive, after the EXIF orientation is applied)."""
    digit: str
    probability: float
    box: tuple


@dataclass
class NumberReading:
    """What read_number found: lines of ReadDigit top to bottom, and the picture's upright size in pixels."""
    lines: list
    size: tuple

    @property
    def numbers(self):
        return ["".join(d.digit for d in line) for line in self.lines]

    @property
    def number(self):
        return "\n".join(self.numbers)

    @property
    def confidence(self):
        p = 1.0
        for line in self.lines:
            for d in line:
                p *= d.probability
        return p


@dataclass
class _Ink:
    """The ink of a picture at the number resolution: contrast against the paper (paper 0, ink positive)."""
    ink: np.ndarray     # float32 contrast map
    strong: np.ndarray  # bool: surely ink (the mask parts are found in)
    noise: float        # robust spread of the paper in `ink`
    level: float        # typical contrast of the ink (90th percentile)
    scale: float        # picture pixels per map pixel
    labels: np.ndarray = None  # the connected parts of `strong`, once _find_parts has run


def _number_ink(plane, ink_is_alpha, picture_size):
    """The paper surface from the coarse copy, as in _find_digit, then the ink at NUMBER_MAX on a side."""
    coarse_img, cfactor = _reduce_to(plane, ANALYSIS_MAX)
    coarse = _to_float(coarse_img)
    coef, cnoise = _fit_background(coarse)
    flat = coarse - _surface(coef, np.arange(coarse.shape[0]) + 0.5, np.arange(coarse.shape[1]) + 0.5,
                             coarse.shape)
    sign = -1.0 if not ink_is_alpha and _is_dark_on_light(flat, cnoise) else 1.0
    fine_img, ffactor = _reduce_to(plane, NUMBER_MAX)
    fine = _to_float(fine_img)
    h, w = fine.shape
    # the fitted surface is in coarse-pixel units: map the fine pixel centres onto it
    rows = (np.arange(h) + 0.5) * ffactor / cfactor
    cols = (np.arange(w) + 0.5) * ffactor / cfactor
    ink = (sign * (fine - _surface(coef, rows, cols, coarse.shape))).astype(np.float32)
    noise = max(_spread(ink), 0.5 / 255)
    candidates = ink > 4.0 * noise + 0.02
    if candidates.sum() < 4:
        raise NoDigitError("no digits found (the picture is blank)")
    level = float(np.percentile(ink[candidates], 90))
    if level < max(0.08, 8.0 * noise):
        raise NoDigitError("no digits found (nothing stands out from the background)")
    strong = ink > max(0.45 * level, 4.0 * noise + 0.02)
    scale = picture_size[0] / w
    return _Ink(ink, strong, noise, level, scale)


@dataclass
class _Part:
    """One connected part of the ink mask: its label, box (y0, y1, x0, x1; y1 and x1 inclusive), ink mass."""
    label: int
    y0: int
    y1: int
    x0: int
    x1: int
    mass: float
    edge: bool

    @property
    def h(self):
        return self.y1 - self.y0 + 1

    @property
    def w(self):
        return self.x1 - self.x0 + 1

    @property
    def cx(self):
        return (self.x0 + self.x1 + 1) / 2.0


def _find_parts(found):
    """The connected parts of the ink mask as _Part, and the label image."""
    labels, ids, mass, (y0, y1, x0, x1), edge = _parts(found.strong, found.ink)
    found.labels = labels
    return [_Part(int(ids[i]), int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i]), float(mass[i]),
                          bool(edge[i])) for i in range(ids.size)]


def _group_lines(parts):
    """Parts -> lines, top to bottom: [(digit height H, [parts])].

    The tall parts (at least 40% of the tallest) say which rows hold digits: each covers its box less LINE_CORE
    at top and bottom, so a 7 slanting into the next line does not chain two lines into one. Rows covered by
    no tall part separate lines; every other part goes to the line its centre is nearest to.
    """
    if not parts:
        return []
    tallest = max(p.h for p in parts)
    tall = [p for p in parts if p.h >= 0.4 * tallest]
    spans = sorted((p.y0 + LINE_CORE * p.h, p.y1 - LINE_CORE * p.h) for p in tall)
    bands = []
    for top, bottom in spans:
        if bands and top <= bands[-1][1]:
            bands[-1][1] = max(bands[-1][1], bottom)
        else:
            bands.append([top, bottom])
    members = [[] for _ in bands]
    for p in parts:
        centre = (p.y0 + p.y1) / 2.0
        dist = [max(top - centre, centre - bottom, 0.0) for top, bottom in bands]
        members[int(np.argmin(dist))].append(p)
    lines = []
    for group in members:
        heights = [p.h for p in group if p.h >= 0.4 * tallest]
        height = float(np.median(heights)) if heights else float(max(p.h for p in group))
        lines.append((height, group))
    return lines


def _classify_marks(height, group):
    """Split a line's parts into digit parts and marks: ([digit parts], [(char, part)] for '.' and '-').

    A ruled line (long, flat) and specks are dropped. A short part is kept as a piece of a digit when it lies
    over a tall part's columns (the bar of a 5, the top of a 7), or is a flat stroke at the top that touches them
    (a 5's bar reaching past its body); on the baseline between digits and about as tall as wide it is a decimal
    point; at mid height and flat, a dash; anything else short is a speck.
    """
    tall = [p for p in group if p.h >= SPECK_HEIGHT * height]
    bottom = float(np.median([p.y1 for p in tall])) if tall else 0.0
    top = float(np.median([p.y0 for p in tall])) if tall else 0.0
    broken = _broken_digits(height, group, tall)
    digits, marks = [], []
    for p in group:
        if p.w > 3 * height and p.h < 0.3 * height:
            continue  # a ruled line or an underline
        if p.h >= SPECK_HEIGHT * height or id(p) in broken:
            digits.append(p)
            continue
        if p.w < 0.06 * height and p.h < 0.06 * height:
            continue  # dust
        overlap = max((_column_overlap(p, q) for q in tall), default=0)
        if overlap >= 0.4 * p.w or _is_flag(p, tall, height):
            digits.append(p)  # a detached piece of the digit above or below it, or a 5's bar reaching past it
            continue
        between = any(q.x1 < p.x0 for q in tall) and any(q.x0 > p.x1 for q in tall)
        mid = (p.y0 + p.y1) / 2.0
        if between and p.y1 >= bottom - 0.15 * height and DOT_MIN * height <= min(p.w, p.h) \
                and p.h <= 0.25 * height and p.w <= 0.3 * height and p.w <= 2.5 * p.h \
                and _clear_of(p, tall, DOT_GAP * height):
            marks.append((".", p))
        elif between and abs(mid - (top + bottom) / 2) < 0.25 * height and p.w >= 0.2 * height \
                and p.w >= 2.5 * p.h and _clear_of(p, tall, 0.12 * height):
            marks.append(("-", p))
        elif p.x1 < min((q.x0 for q in tall), default=0) and p.w >= 0.2 * height and p.w >= 2.5 * p.h \
                and abs(mid - (top + bottom) / 2) < 0.25 * height:
            marks.append(("-", p))  # a minus sign before the number
    return digits, marks


def _broken_digits(height, group, tall):
    """The ids of short parts that are the pieces of one faint digit: apart from every tall part's columns,
    each within CLUSTER_GAP of the next, and together at least PIECE_HEIGHT of the line's digit height. An 8
    written faintly in five pieces, each under SPECK_HEIGHT, was dropped as five specks ('0353837' read
    '035337', development set, MNIST train)."""
    near = CLUSTER_GAP * height
    loose = [p for p in group if p.h < SPECK_HEIGHT * height and p.w <= 3 * height
             and max(p.w, p.h) >= 0.06 * height and all(_column_overlap(p, q) < 0 for q in tall)]
    groups = []  # chains of pieces, each near the next along both x and y
    for p in loose:
        joined = [g for g in groups if any(_box_gap(p, q) <= near for q in g)]
        groups = [g for g in groups if all(g is not j for j in joined)] + [sum(joined, []) + [p]]
    return {id(p) for g in groups if len(g) > 1
            and max(q.y1 for q in g) - min(q.y0 for q in g) + 1 >= PIECE_HEIGHT * height for p in g}


def _box_gap(p, q):
    """The larger of the gaps between two parts' boxes along x and along y (0 or less: they touch or overlap)."""
    return max(-_column_overlap(p, q), max(p.y0, q.y0) - min(p.y1, q.y1) - 1)


def _is_flag(p, tall, height):
    """A flat stroke (at least 0.3 H wide and twice as wide as tall) at the top of a digit whose columns it only
    touches or overlaps a little: the bar of a 5 written apart and reaching past its body (36 of MNIST's 892
    test 5s written 60 px tall). A speck's rule dropped it, and the body alone was read as a 3. Chosen on the
    development sets (MNIST train, seeds 202 and 303): it changed 18 of their 2,400 pictures, 10 of them read
    right before and all 18 after."""
    if p.w < 0.3 * height or p.w < 2 * p.h:
        return False
    return any(_column_overlap(p, q) >= -NEAR_GAP * height and p.y0 <= q.y0 + 0.15 * height for q in tall)


def _column_overlap(p, q):
    """How many columns parts p and q share (negative: the gap between them)."""
    return min(p.x1, q.x1) - max(p.x0, q.x0) + 1


def _clear_of(p, others, gap):
    """True when part p keeps at least `gap` pixels from every other part along x."""
    return all(q.x0 - p.x1 > gap or p.x0 - q.x1 > gap for q in others)


def _clusters(height, parts):
    """Digit parts -> clusters along x: parts that overlap or nearly touch belong to one reading problem."""
    clusters = []
    for p in sorted(parts, key=lambda p: p.x0):
        if clusters and p.x0 <= max(q.x1 for q in clusters[-1]) + CLUSTER_GAP * height:
            clusters[-1].append(p)
        else:
            clusters.append([p])
    return clusters


def _cut_positions(height, cluster, found, typical=None, straight=False):
    """Where a cluster may be cut between digits: a list of seams, each the column of the cut in every row of
    the cluster's box (pixels left of it go left). The first and last are the box's edges.

    A seam runs from top to bottom through as little ink as it can (a minimum-cost path, a step sideways at
    most per row), so it slips between digits that overlap without touching and crosses touching strokes at
    their junction (in a cluster that is probably several touching digits they go straighter, see SEAM_INK).
    Seams end at the bottom at the gaps between parts and, in parts wider than CUT_INSIDE_WIDTH (a digit with a
    touching 1 is only a little wider than one digit), at the thin columns of their ink (local minima of the
    column sums) and on a coarse grid.
    """
    y0, y1 = min(p.y0 for p in cluster), max(p.y1 for p in cluster) + 1
    x0, x1 = min(p.x0 for p in cluster), max(p.x1 for p in cluster) + 1
    h, w = y1 - y0, x1 - x0
    mask = np.isin(found.labels[y0:y1, x0:x1], [p.label for p in cluster])
    ends = set()
    order = sorted(cluster, key=lambda p: p.cx)
    for a, b in zip(order, order[1:]):
        if a.w < CUTTABLE_WIDTH * height and b.w < CUTTABLE_WIDTH * height:
            ends.add(int(round((a.cx + b.cx) / 2)) - x0)
    profile = mask.sum(0).astype(np.float32)
    smooth = np.convolve(profile, np.ones(3, np.float32) / 3, mode="same")
    for p in cluster:
        if p.w < CUT_INSIDE_WIDTH * height:
            continue
        margin = max(2, int(0.2 * height))
        lo, hi = p.x0 - x0 + margin, p.x1 + 1 - x0 - margin
        for i in range(max(lo, 1), min(hi, w - 1)):
            if smooth[i] <= smooth[i - 1] and smooth[i] <= smooth[i + 1]:
                ends.add(i)
        ends.update(range(lo, hi, max(2, int(height / 8))))
    ends = sorted(e for e in ends if 1 <= e < w)
    seams = [np.zeros(h, np.int32)]
    if ends:
        several = _probably_several(height, cluster, typical)
        ink_cost, step_cost = (SEAM_INK_SEVERAL, SEAM_STEP_SEVERAL) if several else (SEAM_INK, SEAM_STEP)
        cost = 1.0 + ink_cost * np.where(mask, np.clip(found.ink[y0:y1, x0:x1] / found.level, 0, 1), 0.0)
        paths = [_seams_ending_at(cost, ends, step_cost)]
        if several:
            # also seams that start at a gap at the top: a seam from the bottom wanders around the stem of a 7
            # and comes out beyond the neighbour its bar reaches over, so the 7 alone is never a candidate
            paths.append(_seams_ending_at(cost[::-1], ends, step_cost)[::-1])
            if straight:
                paths.append(np.repeat(np.asarray(ends, np.int32)[None, :], h, 0))
        paths = np.concatenate(paths, 1)
        # seams that split the ink the same way are one cut: count the ink left of each seam, row by row
        ink_left = np.cumsum(np.pad(mask, ((0, 0), (1, 0))), 1)[np.arange(h)[:, None], paths]
        _, first = np.unique(ink_left.T, axis=0, return_index=True)
        seams += [paths[:, k] for k in first if 0 < ink_left[:, k].sum() < mask.sum()]
    seams.append(np.full(h, w, np.int32))
    seams.sort(key=lambda s: float(s.mean()))
    return (y0, y1, x0, x1), seams


def _seams_ending_at(cost, ends, step_cost):
    """Minimum-cost paths from the top row to each column in `ends` of the bottom row, a step sideways at most
    per row (each costing step_cost more): the column of every seam in every row, (rows, len(ends))."""
    h, w = cost.shape
    acc = cost[0].astype(np.float32)
    step = np.zeros((h, w), np.int8)
    for r in range(1, h):
        left = np.concatenate([[np.inf], acc[:-1]]) + step_cost
        right = np.concatenate([acc[1:], [np.inf]]) + step_cost
        choice = np.argmin(np.stack([left, acc, right]), 0)
        step[r] = choice - 1
        acc = cost[r] + np.minimum(np.minimum(left, acc), right)
    paths = np.empty((h, len(ends)), np.int32)  # every seam traced back up at once
    x = np.asarray(ends, np.int32)
    paths[h - 1] = x
    for r in range(h - 1, 0, -1):
        x = np.clip(x + step[r, x], 0, w - 1)
        paths[r - 1] = x
    return paths


def candidate_mask(found, cluster, box, left, right):
    """The ink of a cluster between two seams, as a bool mask over the cluster's box (y0, y1, x0, x1) of the map."""
    y0, y1, x0, x1 = box
    cols = np.arange(x1 - x0)[None, :]
    between = (cols >= left[:, None]) & (cols < right[:, None])
    return np.isin(found.labels[y0:y1, x0:x1], [p.label for p in cluster]) & between


def _candidate(found, height, cluster, box, left, right, typical=None):
    """The ink of a cluster between two seams: (28x28 pixels, box y0 y1 x0 x1 on the map, prior) or None.

    The prior (a log-probability) says how much the candidate looks like one digit by its size against the
    line's digit height: too short is a piece, too wide is probably two digits, and every digit read costs
    SEGMENT_COST, so that a digit is not read as two slivers that each look like a 1.
    """
    y0, y1, x0, x1 = box
    mask = candidate_mask(found, cluster, box, left, right)
    if mask.sum() < 3:
        return None
    ry, rx = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    mask = mask[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1]
    by0, bx0 = y0 + ry[0], x0 + rx[0]
    by1, bx1 = by0 + mask.shape[0], bx0 + mask.shape[1]
    # take in the anti-aliased rim around the strokes, as image_to_mnist does, but not the neighbours' ink
    py0, px0 = max(0, by0 - 1), max(0, bx0 - 1)
    py1, px1 = min(found.ink.shape[0], by1 + 1), min(found.ink.shape[1], bx1 + 1)
    big = np.zeros((py1 - py0, px1 - px0), bool)
    big[by0 - py0:by1 - py0, bx0 - px0:bx1 - px0] = mask
    keep = big | (ndimage.binary_dilation(big, EIGHT) & (found.labels[py0:py1, px0:px1] == 0))
    ink = np.where(keep, found.ink[py0:py1, px0:px1], 0.0)
    n = found.noise
    crop = np.clip((ink - 3.0 * n) / max(found.level - 3.0 * n, 1e-6), 0.0, 1.0).astype(np.float32)
    ry, rx = np.nonzero((crop > 0).any(1))[0], np.nonzero((crop > 0).any(0))[0]
    if ry.size == 0:
        return None
    crop = crop[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1]
    h, w = by1 - by0, bx1 - bx0
    prior = -_segment_cost(height, cluster, typical)
    if h < PIECE_HEIGHT * height:  # a piece of a digit, or a sliver left by a bad cut
        prior -= 12.0 * (PIECE_HEIGHT - h / height)
    if w > WIDE * height:  # wider than most single digits: probably two
        prior -= WIDE_COST * (w / height - WIDE)
    try:
        pixels = fit_and_centre(crop)
    except NoDigitError:
        return None
    return pixels, (int(by0), int(by1), int(bx0), int(bx1)), prior, _context(found, height, big, py0, px0)


CONTEXT_SIDE = 1.6  # the context window is this many digit heights on a side: a wide digit and its neighbours' edges


def _context(found, height, mask, y0, x0):
    """What the number judge sees besides the candidate: a square of CONTEXT_SIDE digit heights around it at the
    line's scale (so its size shows), 28x28, its own ink 1 and the other ink 0.5 (so a cut through a stroke
    shows). mask: the candidate's ink, a bool array whose top-left pixel is (y0, x0) on the map."""
    side = max(4, int(round(CONTEXT_SIDE * height)))
    ys, xs = np.nonzero(mask)
    cy, cx = y0 + int(round(ys.mean())), x0 + int(round(xs.mean()))
    top, left = cy - side // 2, cx - side // 2
    window = np.zeros((side, side), np.float32)
    sy0, sx0 = max(0, top), max(0, left)
    sy1, sx1 = min(found.strong.shape[0], top + side), min(found.strong.shape[1], left + side)
    window[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = 0.5 * found.strong[sy0:sy1, sx0:sx1]
    my0, mx0 = y0 - top, x0 - left  # the mask's place in the window, clipped to it
    h, w = mask.shape
    a0, b0 = max(0, -my0), max(0, -mx0)
    a1, b1 = min(h, side - my0), min(w, side - mx0)
    if a1 > a0 and b1 > b0:
        sub = window[my0 + a0:my0 + a1, mx0 + b0:mx0 + b1]
        sub[mask[a0:a1, b0:b1]] = 1.0
    small = Image.fromarray(window, "F").resize((FIELD, FIELD), Image.Resampling.BOX)
    return np.asarray(small, np.float32)


def _width(cluster):
    """A cluster's width along x in map pixels."""
    return max(p.x1 for p in cluster) - min(p.x0 for p in cluster) + 1


def _segment_cost(height, cluster, typical):
    """What each digit read in a cluster costs (log-probability): SEGMENT_COST in a cluster that may well be one
    digit, so that a wide 0 or a broken 2 is not read as slivers; SEGMENT_COST_WIDE in one that is probably
    several touching digits (the classifier reads two of them as one confident digit, an 8 for "81").
    typical: the median width of the line's clusters when it has several (a writer who spaces the digits),
    else None (one cluster: touching writing). A cluster is probably several digits when it is wider than
    MULTI_WIDTH digit heights and, on a spaced line, PAIR_RATIO times its typical cluster."""
    return SEGMENT_COST_WIDE if _probably_several(height, cluster, typical) else SEGMENT_COST


def _probably_several(height, cluster, typical):
    """True when a cluster is probably several touching digits (see MULTI_WIDTH, PAIR_RATIO)."""
    width = _width(cluster)
    return width > MULTI_WIDTH * height and (typical is None or width > PAIR_RATIO * typical)


def _best_chain(cuts, scores, count=None):
    """Viterbi over a cluster's cuts: the chain of candidates from the first cut to the last with the highest
    total score (scores[(i, j)] for the candidate between cuts i and j). With count, exactly that many
    candidates (None when impossible). Returns (total, [(i, j), ...])."""
    m = len(cuts)
    most = count if count is not None else m
    best = [dict() for _ in range(m)]  # best[j][k] = (score, previous i) for k candidates ending at cut j
    best[0][0] = (0.0, None)
    for j in range(1, m):
        for i in range(j):
            s = scores.get((i, j))
            if s is None:
                continue
            for k, (total, _) in best[i].items():
                if k + 1 <= most and (k + 1 not in best[j] or total + s > best[j][k + 1][0]):
                    best[j][k + 1] = (total + s, i)
    end = best[m - 1]
    if not end:
        return None
    k = count if count is not None else max(end, key=lambda k: end[k][0])
    if k not in end:
        return None
    total, chain, j = end[k][0], [], m - 1
    while j > 0:
        i = best[j][k][1]
        chain.append((i, j))
        j, k = i, k - 1
    return total, chain[::-1]


@dataclass
class NumberCandidates:
    """Every way read_number considers of cutting a picture's ink into digits, before any is classified.

    pixels: (N, 28, 28) float32, each candidate fitted and centred like an MNIST digit; context: (N, 28, 28)
    float32, the ink around each at the line's scale, for the number judge (see _context); boxes: their boxes
    (y0, y1, x0, x1) on the ink map; keys: (cluster index, i, j), the candidate between seams i and j of that
    cluster; priors: their log-prior by size (see _candidate); problems: the clusters (line, parts, cuts, digit
    height, typical width); marks: (line, "." or "-", part); found: the ink map; size: the picture's size."""
    pixels: np.ndarray
    context: np.ndarray
    boxes: list
    keys: list
    priors: np.ndarray
    problems: list
    marks: list
    found: _Ink
    size: tuple

    def picture_box(self, k):
        """Candidate k's box in the picture's own pixels: (x0, y0, x1, y1), x1 and y1 exclusive."""
        return _picture_box(self.boxes[k], self.found.scale, self.size)


def number_candidates(source, digits=None, max_digits=MAX_DIGITS, straight=False):
    """A picture of a number -> NumberCandidates: its lines, clusters, seams and the candidate digits between
    them (the first half of read_number, which the number judge's training reuses). straight: also cut
    clusters of several touching digits straight down (see SEAM_INK_SEVERAL), for a reader with a judge.
    Raises as read_number."""
    img = open_image(source)
    size = tuple(img.info.get("full_size", img.size))
    plane, ink_is_alpha = _grey_plane(img)
    found = _number_ink(plane, ink_is_alpha, size)
    parts = _find_parts(found)
    if parts and not all(p.edge for p in parts):
        parts = [p for p in parts if not p.edge]  # a table edge or dark margin beside the page
    problems = []  # (line index, cluster, cuts, height, typical)
    marks = []     # (line index, char, part)
    for li, (height, group) in enumerate(_group_lines(parts)):
        kept, line_marks = _classify_marks(height, group)
        marks += [(li, c, p) for c, p in line_marks]
        clusters = _clusters(height, kept)
        typical = float(np.median([_width(c) for c in clusters])) if len(clusters) > 1 else None
        for cluster in clusters:
            problems.append((li, cluster, _cut_positions(height, cluster, found, typical, straight), height, typical))
    if not problems:
        raise NoDigitError("no digits found")
    # a first bound before any work: each cluster holds at least one digit, a cut every H/4 at most
    if len(problems) > max_digits:
        raise TooManyDigitsError(f"more than {max_digits} digits (found {len(problems)} separate marks): "
                                 f"not a number, or a page of text")
    if digits is not None:
        problems = _join_to(problems, digits, found, straight)
    pixels, context, boxes, keys, priors = [], [], [], [], []
    for n, (li, cluster, (box, seams), height, typical) in enumerate(problems):
        for i in range(len(seams)):
            for j in range(i + 1, len(seams)):
                if float((seams[j] - seams[i]).max()) > MAX_DIGIT_WIDTH * height and not (i == 0 and j == len(seams) - 1):
                    continue  # the whole cluster stays a candidate, so every cluster has a reading
                got = _candidate(found, height, cluster, box, seams[i], seams[j], typical)
                if got is None:
                    continue
                pixels.append(got[0])
                boxes.append(got[1])
                priors.append(got[2])
                context.append(got[3])
                keys.append((n, i, j))
                if len(keys) > MAX_CANDIDATES:
                    raise TooManyDigitsError(f"more than {max_digits} digits, or ink that is not digits (over "
                                             f"{MAX_CANDIDATES} ways to cut it): not a number")
    if not pixels:
        raise NoDigitError("no digits found")
    return NumberCandidates(np.stack(pixels), np.stack(context), boxes, keys, np.asarray(priors), problems, marks,
                            found, size)


def _mix(probs, judge_digits):
    """The classifier's digit probabilities and the judge's (renormalised over the ten digits), mixed
    geometrically with JUDGE_DIGITS the judge's share: it has seen digits with a sliver of their neighbour."""
    judge_digits = judge_digits / np.maximum(judge_digits.sum(1, keepdims=True), 1e-12)
    logs = (1 - JUDGE_DIGITS) * np.log(np.maximum(probs, 1e-12)) + JUDGE_DIGITS * np.log(np.maximum(judge_digits, 1e-12))
    mixed = np.exp(logs - logs.max(1, keepdims=True))
    return mixed / mixed.sum(1, keepdims=True)


def read_number(source, classify, digits=None, max_digits=MAX_DIGITS, judge=None):
    """A picture of a number (or several, one per line) -> NumberReading, lines top to bottom.

    classify: pixels (N, 28, 28) float32 in [0, 1], white on black -> (N, 10) probabilities (any array-like);
    it is called once, with every candidate digit of the picture. judge (optional): (pixels, context) ->
    (N, 11) probabilities, the ten digits and "not one digit" (a piece, two touching digits), as
    number_judge.py's judge gives; the choice then weighs each candidate by how likely it is one whole digit
    (JUDGE_WEIGHT), and the digits read mix the judge's reading in (JUDGE_DIGITS). digits: the
    number of digits there are (all lines together); the reader cuts or joins to find exactly that many. Raises
    ImageError (one line) for an unreadable picture, NoDigitError when it holds no ink and TooManyDigitsError
    past max_digits.
    """
    try:
        cands = number_candidates(source, digits, max_digits, straight=judge is not None)
    except TooManyDigitsError:
        if judge is None:
            raise
        # Straight cuts triple the seams of a cluster of several touching digits: one of six digits can pass
        # MAX_CANDIDATES with them (3 of 200 touching pictures of the seed-202 development set were refused).
        # They are an extra, so such a picture is read without them, as a reader without a judge reads it.
        cands = number_candidates(source, digits, max_digits, straight=False)
    n = len(cands.keys)
    probs = np.asarray(classify(cands.pixels), dtype=np.float64).reshape(n, 10)
    whole = 0.0
    if judge is not None:
        judged = np.asarray(judge(cands.pixels, cands.context), dtype=np.float64).reshape(n, 11)
        whole = JUDGE_WEIGHT * np.log(np.maximum(1.0 - judged[:, 10], 1e-12))  # log P(one whole digit), weighted
        cut = np.array([not (i == 0 and j == len(cands.problems[c][2][1]) - 1) for c, i, j in cands.keys])
        probs[cut] = _mix(probs[cut], judged[cut, :10])  # a digit cut from its neighbours: the judge has seen those
    best = probs.argmax(1)
    logp = np.log(np.maximum(probs[np.arange(n), best], 1e-12)) + cands.priors + whole
    table = {}
    for k, (c, i, j) in enumerate(cands.keys):
        table.setdefault(c, {})[(i, j)] = (k, float(logp[k]))
    chains = _choose_counts(cands.problems, table, digits)
    read = {}
    for c, chain in chains.items():
        li = cands.problems[c][0]
        for i, j in chain:
            k = table[c][(i, j)][0]
            read.setdefault(li, []).append((cands.boxes[k], str(int(best[k])), float(probs[k, best[k]])))
    for li, char, p in cands.marks:
        read.setdefault(li, []).append(((p.y0, p.y1 + 1, p.x0, p.x1 + 1), char, 1.0))
    total = sum(len(v) for v in read.values())
    if total > max_digits:
        raise TooManyDigitsError(f"more than {max_digits} digits ({total}): not a number, or a page of text")
    lines = []
    for li in sorted(read):
        line = sorted(read[li], key=lambda r: r[0][2] + r[0][3])
        lines.append([ReadDigit(char, prob, _picture_box(box, cands.found.scale, cands.size))
                      for box, char, prob in line])
    return NumberReading(lines, cands.size)


def _picture_box(box, scale, size):
    y0, y1, x0, x1 = box
    return (int(x0 * scale), int(y0 * scale), min(size[0], int(np.ceil(x1 * scale))),
            min(size[1], int(np.ceil(y1 * scale))))


def _join_to(problems, digits, found, straight=False):
    """With a known count: while there are more clusters than digits, join the two nearest neighbours on a line
    (a digit in two pieces far apart); fewer clusters than digits are left to the cutting."""
    problems = list(problems)
    while len(problems) > digits:
        gaps = [((min(p.x0 for p in b[1]) - max(p.x1 for p in a[1])) / a[3], n)
                for n, (a, b) in enumerate(zip(problems, problems[1:])) if a[0] == b[0]]
        if not gaps:
            break
        _, n = min(gaps)
        (li, ca, _, ha, typical), (_, cb, _, hb, _) = problems[n], problems[n + 1]
        height = max(ha, hb)
        cluster = ca + cb
        problems[n:n + 2] = [(li, cluster, None, height, typical)]
    return [(li, c, cuts if cuts is not None else _cut_positions(h, c, found, t, straight), h, t)
            for li, c, cuts, h, t in problems]


def _choose_counts(problems, table, digits):
    """The best chain of each cluster; with a known total count, the counts per cluster that reach it with the
    highest total score (a small knapsack over the clusters)."""
    if digits is None:
        chains = {}
        for n, (_, _, cuts, _, _) in enumerate(problems):
            got = _best_chain(cuts[1], {key: v[1] for key, v in table.get(n, {}).items()})
            if got is not None:
                chains[n] = got[1]
        return chains
    options = []
    for n, (_, _, cuts, _, _) in enumerate(problems):
        scores = {key: v[1] for key, v in table.get(n, {}).items()}
        per_count = {}
        for k in range(1, min(digits, len(cuts[1]) - 1) + 1):
            got = _best_chain(cuts[1], scores, k)
            if got is not None:
                per_count[k] = got
        options.append(per_count)
    reach = {0: (0.0, [])}  # total count -> (score, chosen count per cluster so far)
    for per_count in options:
        nxt = {}
        for have, (score, picks) in reach.items():
            for k, (s, _) in per_count.items():
                if have + k <= digits and (have + k not in nxt or score + s > nxt[have + k][0]):
                    nxt[have + k] = (score + s, picks + [k])
        reach = nxt or reach
    if digits in reach:
        picks = reach[digits][1]
    else:  # cannot reach it: the closest count that can be read
        picks = reach[min(reach, key=lambda c: (abs(c - digits), -reach[c][0]))][1]
    return {n: options[n][k][1] for n, k in enumerate(picks) if k in options[n]}
