"""A person's picture -> an MNIST-style 28x28 digit: image_to_mnist() and the steps it takes, in the order they run.

Used by predict.py, app.py and demo.py, never by training (training reads MNIST itself, see data_loader.py).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
# Everything is Pillow and numpy. scipy.ndimage would give labelling, dilation and centre of mass in one call
# each, but importing it costs about half a second, which a one-image prediction in under 2 s cannot spare;
# the hand-written pieces (_label_components, _dilate, _place_by_mass) are a dozen lines of numpy each.
# Pillow has no Otsu or robust background either, hence _spread and _fit_background.
# ------------------------------------------------------------------------------------------------------------

WORK_MAX = 1024      # longest side the pixels are worked on at; bigger pictures are box-reduced first
ANALYSIS_MAX = 128   # longest side of the copy used to find paper, noise and the digit
DIGIT_BOX = 20       # MNIST digits fit a 20x20 box ...
FIELD = 28           # ... inside a 28x28 field ...
MASS_CENTRE = 14.0   # ... with the centre of mass on pixel 14 (measured: 14.00 +- 0.29 over the training set)
MIN_STROKE = 0.7     # strokes thinner than this in the 20x20 box (MNIST: 1st percentile 1.06, median 2.0) ...
TARGET_STROKE = 2.0  # ... are thickened to about the MNIST median before resampling
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm", ".pnm")


class ImageError(ValueError):
    """A picture that cannot be turned into an MNIST digit, phrased in one line for the person who sent it."""


class NoDigitError(ImageError):
    """The picture was read, but it holds no ink: a blank page, a flat colour, noise only."""


def open_image(source):
    """A file path, PIL image or array -> a fully decoded PIL image, first frame, EXIF orientation applied.

    Raises ImageError with one line for a missing, empty, unreadable, truncated or non-image file.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError
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
    except OSError as err:
        raise ImageError(f"cannot be opened ({err.strerror or first_line(err, 160)})") from None
    with opened:
        return _upright(_decoded(opened))


def _decoded(img):
    """Decode a PIL image's first frame now, so a damaged file fails here with one line."""
    from PIL import Image
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
    from PIL import ImageOps
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a malformed tag says nothing reliable about orientation: use the pixels as stored
        return img


def _reduce_to(img, max_side):
    """Box-average a PIL image by an integer factor so its longest side is at most max_side: (image, factor)."""
    factor = -(-max(img.size) // max_side)
    return (img.reduce(factor) if factor > 1 else img), factor


def _to_float(img):
    """A single-channel PIL image (L, or F already in [0, 1]) as a float32 array in [0, 1]."""
    import numpy as np
    arr = np.asarray(img, dtype=np.float32)
    return arr if img.mode == "F" else arr / 255.0


def _border(arr):
    """The outer ring of an array (about 5% of the side, at least one pixel), flattened."""
    import numpy as np
    b = max(1, round(0.05 * min(arr.shape)))
    return np.concatenate([arr[:b].ravel(), arr[-b:].ravel(), arr[b:-b, :b].ravel(), arr[b:-b, -b:].ravel()])


def _spread(values):
    """Robust standard deviation (scaled median absolute deviation): JPEG noise and a few ink pixels don't move it."""
    import numpy as np
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
    import numpy as np
    from PIL import Image
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
    import numpy as np
    margin = max(0.08, 3.0 * noise)
    return bool(np.clip(-flat - margin, 0, None).sum() > np.clip(flat - margin, 0, None).sum())


def _surface(coef, rows, cols, shape):
    """The fitted paper surface at the given (fractional) coarse-pixel centres: a (len(rows), len(cols)) array."""
    import numpy as np
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
    import numpy as np
    p = np.pad(coarse, 1, mode="edge")
    step = np.maximum.reduce([np.abs(coarse - p[:-2, 1:-1]), np.abs(coarse - p[2:, 1:-1]),
                              np.abs(coarse - p[1:-1, :-2]), np.abs(coarse - p[1:-1, 2:])])
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
    import numpy as np
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
        b = basis[background]  # least squares by the 6x6 normal equations: lstsq's SVD is 20x slower here
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
    """8-connected components of a boolean array: an int array where each part holds one label, 0 elsewhere.

    Label propagation with pointer jumping (every pixel ends up holding the largest pixel index of its part),
    which settles in a few dozen numpy passes on the small analysis copy; see the section header for why not
    scipy.ndimage.label.
    """
    import numpy as np
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w), 0)
    padded = np.zeros((h + 2, w + 2), np.int32)
    while True:
        padded[1:-1, 1:-1] = labels
        grown = labels.copy()
        for dy in range(3):
            for dx in range(3):
                if dy != 1 or dx != 1:
                    np.maximum(grown, padded[dy:dy + h, dx:dx + w], out=grown)
        grown *= mask
        flat = grown.ravel()
        inside = flat > 0
        flat[inside] = flat[flat[inside] - 1]  # jump: take the label of the pixel my label names
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _parts(mask, ink):
    """The connected parts of a mask: (labels, ids, and per part its ink mass, box y0 y1 x0 x1, and edge flag).

    A part is edge-like when it runs along the picture's border for at least 15% of the border's length: the
    table beside the page, a dark photo margin, a shadow coming in from the side. A digit cropped tightly
    touches the border only where its strokes end.
    """
    import numpy as np
    labels = np.zeros(mask.shape, np.int32)
    ry, rx = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if ry.size:
        labels[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1] = _label_components(mask[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1])
    ids, inverse = np.unique(labels[mask], return_inverse=True)
    ys, xs = np.nonzero(mask)
    mass = np.bincount(inverse, weights=ink[mask], minlength=ids.size)
    y0, y1 = np.full(ids.size, 1 << 30), np.full(ids.size, -1)
    x0, x1 = np.full(ids.size, 1 << 30), np.full(ids.size, -1)
    np.minimum.at(y0, inverse, ys)
    np.maximum.at(y1, inverse, ys)
    np.minimum.at(x0, inverse, xs)
    np.maximum.at(x1, inverse, xs)
    h, w = mask.shape
    on_border = (ys == 0) | (xs == 0) | (ys == h - 1) | (xs == w - 1)
    contact = np.bincount(inverse[on_border], minlength=ids.size)
    edge = contact >= 0.15 * 2 * (h + w)
    return labels, ids, mass, (y0, y1, x0, x1), edge


def _digit_region(ink, strong):
    """The pixels that belong to the digit: the heaviest connected part plus the parts near it or nearly as big.

    Specks of dust, JPEG blocks and a stray mark far from the digit are left out, so they neither stretch the
    bounding box nor pull the centre of mass; so are edge-like parts (see _parts). Returns a boolean mask, or
    None when there is no ink.
    """
    import numpy as np
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
    return np.isin(labels, ids[kept])


def _dilate(mask, steps):
    """Grow a boolean mask by `steps` pixels in all eight directions."""
    import numpy as np
    h, w = mask.shape
    for _ in range(steps):
        p = np.zeros((h + 2, w + 2), bool)
        p[1:-1, 1:-1] = mask
        rows = p[:-2] | p[1:-1] | p[2:]
        mask = rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]
    return mask


@dataclass
class DigitRegion:
    """Where _find_digit saw the digit, on a reduced copy of the picture; what _cut_digit needs to cut it out."""
    mask: np.ndarray     # bool, True on the digit, on the reduced copy
    factor: int            # the copy is the picture reduced by this factor
    paper: np.ndarray    # coefficients of the fitted paper surface (see _surface)
    sign: float            # +1 when the ink is brighter than the paper, -1 when darker
    ink_level: float       # 90th percentile of the ink's contrast against the paper
    coarse_shape: tuple    # (rows, columns) of the reduced copy


def _find_digit(plane, ink_is_alpha):
    """Where the digit is, worked out on a copy at most ANALYSIS_MAX on a side (cheap, and box-averaging calms
    the noise). Raises NoDigitError when nothing stands out from the paper.
    """
    import numpy as np
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
    region = _dilate(region, 2 if factor == 1 else 1)  # take in the anti-aliased rim around the strokes
    return DigitRegion(region, factor, coef, sign, ink_level, coarse.shape)


def _cut_digit(plane, found):
    """The digit at working resolution, cropped to its ink: paper exactly 0, ink about 1 (float32 array)."""
    import numpy as np
    region, factor, coef, sign, ink_level = found.mask, found.factor, found.paper, found.sign, found.ink_level
    coarse_shape = found.coarse_shape
    ry, rx = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    y0, y1, x0, x1 = ry[0], ry[-1] + 1, rx[0], rx[-1] + 1
    box = (x0 * factor, y0 * factor, min(x1 * factor, plane.width), min(y1 * factor, plane.height))
    window = _to_float(plane.crop(box))
    h, w = window.shape
    window = sign * (window - _surface(coef, (np.arange(h) + box[1] + 0.5) / factor,
                                       (np.arange(w) + box[0] + 0.5) / factor, coarse_shape))
    inside = region[y0:y1, x0:x1].repeat(factor, 0).repeat(factor, 1)[:h, :w]
    paper = window[~inside]
    noise = _spread(paper) if paper.size >= 50 else 0.0
    floor = 4.0 * noise if noise > 0 else 0.5 / 255
    ink = np.where(inside, window, 0.0)
    ry, rx = np.nonzero((ink > floor).any(1))[0], np.nonzero((ink > floor).any(0))[0]
    if ry.size == 0:
        raise NoDigitError("no digit found")
    crop = ink[ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1]
    strong = crop[crop > max(floor, 0.25 * ink_level)]
    level = float(np.percentile(strong, 90)) if strong.size else ink_level
    # Paper noise and the faintest JPEG ringing go to exactly 0 (MNIST's background is 0); ink goes to ~1.
    return np.clip((crop - 3.0 * noise) / max(level - 3.0 * noise, 1e-6), 0.0, 1.0).astype(np.float32)


def _stroke_width(binary):
    """Mean stroke width in pixels of a boolean image: area / half the perimeter (a long stroke: L*w / L)."""
    import numpy as np
    area = binary.sum()
    if area == 0:
        return 0.0
    p = np.pad(binary, 1)
    edges = (p[1:, :] != p[:-1, :]).sum() + (p[:, 1:] != p[:, :-1]).sum()
    return float(2.0 * area / edges)


def _fit_digit_box(crop):
    """Scale the cropped digit to fit DIGIT_BOX x DIGIT_BOX, aspect ratio kept, with anti-aliasing.

    Hairlines (a 3-px brush on a 500-px canvas, a fine pen on a scan) would fade to a grey smudge at 20x20,
    so strokes thinner than MIN_STROKE in the box are first thickened, at a resolution where they are about
    one pixel wide, by repeated 3x3 maximum filters (each adds one pixel on either side).
    """
    import numpy as np
    from PIL import Image, ImageFilter
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
        passes = round((TARGET_STROKE * mid / DIGIT_BOX - width * mid_scale) / 2)
        for _ in range(max(0, passes)):
            img = img.filter(ImageFilter.MaxFilter(3))
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
    import numpy as np
    h, w = digit.shape
    total = float(digit.sum())
    cy = float((digit.sum(1) * np.arange(h)).sum() / total)
    cx = float((digit.sum(0) * np.arange(w)).sum() / total)
    top = int(np.clip(np.floor(MASS_CENTRE - cy + 0.5), 0, FIELD - h))
    left = int(np.clip(np.floor(MASS_CENTRE - cx + 0.5), 0, FIELD - w))
    field = np.zeros((FIELD, FIELD), np.float32)
    field[top:top + h, left:left + w] = digit
    return field


def image_to_mnist_pixels(source):
    """A user's picture -> a 28x28 float32 numpy array in [0, 1], white digit on black, as MNIST looks.

    source: a path, a PIL image or a numpy array. Raises ImageError (one line) for unreadable input and
    NoDigitError when the picture holds no ink.
    """
    import numpy as np
    plane, ink_is_alpha = _grey_plane(open_image(source))
    crop = _cut_digit(plane, _find_digit(plane, ink_is_alpha))
    digit = np.clip(_fit_digit_box(crop), 0.0, 1.0)  # Lanczos rings a little below 0 and above 1
    if digit.sum() <= 0:
        raise NoDigitError("no digit found")
    return _place_by_mass(digit)


def image_to_mnist(source, mean=MNIST_MEAN, std=MNIST_STD):
    """A user's picture -> a normalised float tensor (1, 28, 28), ready for a model trained on MNIST.

    Pass the checkpoint's normalization mean and std (ckpt["normalization"]); the defaults are MNIST's.
    Raises ImageError (one line) for unreadable input and NoDigitError when the picture holds no ink.
    """
    pixels = torch.from_numpy(image_to_mnist_pixels(source))
    return ((pixels - mean) / std).unsqueeze(0)


def mnist_to_image(tensor, mean=MNIST_MEAN, std=MNIST_STD):
    """The inverse for looking: a normalised (1, 28, 28) or (28, 28) tensor -> an 8-bit greyscale PIL image."""
    from PIL import Image
    pixels = (tensor.detach().cpu().reshape(FIELD, FIELD) * std + mean).clamp(0, 1)
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy(), "L")
