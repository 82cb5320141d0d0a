"""A person's picture -> an MNIST-style 28x28 digit (image_to_mnist, first half), and a picture of a whole
number -> its lines of ink (number_lines, second half; number_reader.py reads them). Each half's steps come in
the order they run.

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
# Numbers: a picture of several digits -> its lines of ink, for number_reader.py: number_lines()
#
# The same first steps as image_to_mnist (open, ink-bright grey plane, fitted paper surface, ink), at a
# resolution fit for many digits (NUMBER_MAX on a side); then the ink is cut into lines where whole rows hold
# none. Where one digit ends and the next begins is not decided here: the number reader learned it.
# ------------------------------------------------------------------------------------------------------------

NUMBER_MAX = 640         # longest side the ink of a number is found at: 10 digits across still get ~40 px each
MAX_DIGITS = 64          # a picture with more than this is a page of text or noise: refused in one line


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
    level: float        # typical contrast of the ink (90th percentile)
    scale: float        # picture pixels per map pixel


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
    return _Ink(ink, strong, level, scale)


LINE_JOIN = 0.3   # bands of inked rows closer than this share of the taller one's height are one line (the bar
                  # of a 5 above its body); ...
LINE_MIN = 0.3    # ... bands shorter than this share of the tallest are specks, not a line of digits
MAX_MARKS = 2 * MAX_DIGITS  # separate marks past this are a page of text or a sheet of specks, not a number


@dataclass
class NumberLines:
    """What number_lines finds: the lines of ink, top to bottom, each (cover (h, w) float32 in [0, 1], top,
    left) on the ink map; the map's scale (picture pixels per map pixel) and the picture's upright size."""
    lines: list
    scale: float
    size: tuple

    def picture_box(self, box):
        """(y0, y1, x0, x1) on the ink map -> (x0, y0, x1, y1) in the picture's own pixels, x1 and y1 exclusive."""
        y0, y1, x0, x1 = box
        return (int(x0 * self.scale), int(y0 * self.scale), min(self.size[0], int(np.ceil(x1 * self.scale))),
                min(self.size[1], int(np.ceil(y1 * self.scale))))


def number_lines(source):
    """A picture of a number -> NumberLines: the ink found as image_to_mnist finds it (paper surface, polarity),
    at NUMBER_MAX on a side, edge-like parts dropped, cut into lines where whole rows hold no ink. Raises
    ImageError, NoDigitError without ink, TooManyDigitsError past MAX_MARKS separate marks."""
    img = open_image(source)
    size = tuple(img.info.get("full_size", img.size))
    plane, ink_is_alpha = _grey_plane(img)
    found = _number_ink(plane, ink_is_alpha, size)
    labels, ids, _, _, edge = _parts(found.strong, found.ink)
    if ids.size > MAX_MARKS:
        raise TooManyDigitsError(f"more than {MAX_DIGITS} digits ({ids.size} separate marks): not a number, or "
                                 f"a page of text")
    keep = ids[~edge] if not edge.all() else ids  # a table edge or dark margin beside the page is not ink
    mask = ndimage.binary_dilation(np.isin(labels, keep), EIGHT)  # with the soft edge of each stroke
    cover = np.where(mask, np.clip(found.ink / found.level, 0, 1), 0).astype(np.float32)
    inked = np.flatnonzero(np.isin(labels, keep).any(1))
    if not inked.size:
        raise NoDigitError("no digits found")
    starts = np.r_[0, np.flatnonzero(np.diff(inked) > 1) + 1]
    bands = [[inked[i], inked[j - 1]] for i, j in zip(starts, np.r_[starts[1:], inked.size])]  # runs of inked rows
    n = 0
    while n + 1 < len(bands):
        (a0, a1), (b0, b1) = bands[n], bands[n + 1]
        if b0 - a1 - 1 < LINE_JOIN * max(a1 - a0 + 1, b1 - b0 + 1):
            bands[n:n + 2] = [[a0, b1]]
            n = max(n - 1, 0)  # the joined band may now reach the one before it
        else:
            n += 1
    tallest = max(b - a + 1 for a, b in bands)
    lines = []
    for a, b in bands:
        if b - a + 1 >= LINE_MIN * tallest:
            cols = np.flatnonzero(cover[a:b + 1].max(0) > 0)
            lines.append((cover[a:b + 1, cols[0]:cols[-1] + 1], a, cols[0]))
    return NumberLines(lines, found.scale, size)

