"""Augmentation: a different random warp for every training image, drawn on the device in one batched pass.

data_loader.TrainBatches calls apply() on each batch (float images in [0, 1]) when training asks for a level
(train_pytorch.py --augment). Written with affine_grid/grid_sample rather than torchvision's RandomAffine and
ElasticTransform, which draw one set of parameters per call, i.e. the same warp for a whole batch. Nothing here
reads a value back to the host, so a captured CUDA graph replays it. Zero stays zero: apply it before
normalising.
"""
import torch
import torch.nn.functional as F


def gaussian_blur(x, size, sigma):
    """torchvision's, imported on first use: importing torchvision loads its models and torch's compiler,
    seconds at the start of every command that reads MNIST without augmenting it (evaluate.py, export.py)."""
    from torchvision.transforms.v2.functional import gaussian_blur as blur
    return blur(x, [size, size], [sigma, sigma])

# The levels, by name. "strong" adds elastic distortion (Simard et al. 2003:
# a random displacement field smoothed by a Gaussian; alpha 34 and sigma 6 move pixels by about 1.3 px RMS, which
# still looks like handwriting) and a wider rotation; it pays off only over longer schedules (--preset accurate).
# "writers" is the standard warp plus how other people's pens and pictures differ from MNIST's: strokes made
# thicker or thinner (a grey dilation or erosion, random_strokes) and softened by a blur (an upscaled or
# photographed digit); a level of its own, so the figures of the other two levels stay what they were.
# "scans" is the standard warp with a share of the digits shown as a coarse scan (coarse_scans), the way the
# low-resolution pictures of other writers look (an 8x8 grid of ink counts, blown up).
AUGMENTATIONS = {
    "standard": {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1)},
    "strong": {"degrees": 12.0, "translate": 0.1, "scale": (0.9, 1.1), "elastic": 34.0, "elastic_sigma": 6.0},
    "writers": {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "thicker": 1.0, "thinner": 0.5,
                "blur": 1.0},
    "scans": {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1), "coarse": 0.1},
}


def random_strokes(x, thicker=1.0, thinner=0.5, blur=1.0, generator=None):
    """Thicker or thinner strokes and a blur, of a different strength for every image of a float batch (N, 1, H, W).

    Each image draws s in [-1, 1): s > 0 moves it a share s * thicker of the way to its grey dilation (the max
    over each 3x3 neighbourhood: about one pixel more ink on every side), s < 0 a share -s * thinner of the way
    to its grey erosion (the min: one pixel less; thinner stays under 1 by default, since a full erosion wipes
    out MNIST's thinnest strokes). Then it moves a share b in [0, blur) of the way to its Gaussian blur (3x3,
    sigma 1). Blending by a per-image share, chosen with torch.where rather than Python branches, keeps it one
    batched pass on the device with nothing read back, so a captured CUDA graph can replay it. Zero stays zero:
    apply it to [0, 1] images before normalising.
    """
    share = torch.rand(x.shape[0], 2, 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype)
    s, b = share[:, 0] * 2 - 1, share[:, 1] * blur
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)  # padding counts as -inf there: the border does not erode
    target = torch.where(s > 0, dilated, eroded)
    x = torch.lerp(x, target, torch.where(s > 0, s * thicker, -s * thinner))
    return torch.lerp(x, gaussian_blur(x, 3, 1.0), b)


def coarse_scans(x, share, generator=None):
    """A share of a float batch (N, 1, 28, 28) shown as a coarse scan, each image drawn in or out on its own.

    The UCI optical digits were made so (Alpaydin and Kaynak): a 32x32 bitmap, its ink counted in 4x4 blocks to
    an 8x8 grid of 0-16; a user's picture of one is that grid blown up and soft. Here: the ink thresholded, its
    cover averaged over a 10x10 grid (MNIST's 20-pixel box then spans about 7 cells, as the digit spans 7 of
    the 8 there), rounded to the 17 counts, blown up again, bicubic. torch.where, not a Python branch, picks
    the images: one batched pass with nothing read back, as a captured CUDA graph needs.
    """
    grid = F.adaptive_avg_pool2d((x > 0.5).to(x.dtype), 10)
    scan = F.interpolate(torch.round(grid * 16) / 16, size=x.shape[-2:], mode="bicubic", align_corners=False)
    # As preprocess reads such a picture: the faintest blur taken for paper, the ink stretched to full strength.
    top = 0.8 * scan.amax((2, 3), keepdim=True)
    scan = (scan - 0.15) / (top - 0.15).clamp_min(0.1)
    pick = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator, dtype=x.dtype) < share
    return torch.where(pick, scan.clamp(0, 1), x)


def augment_batch(x, thicker=0.0, thinner=0.0, blur=0.0, coarse=0.0, generator=None, **affine):
    """One level of AUGMENTATIONS on a float batch in [0, 1]: random_strokes or coarse_scans where the level has
    them, then random_affine. The levels without them draw exactly the random numbers they always drew."""
    if thicker or thinner or blur:
        x = random_strokes(x, thicker, thinner, blur, generator=generator)
    if coarse:
        x = coarse_scans(x, coarse, generator=generator)
    return random_affine(x, **affine, generator=generator)


def random_affine(x, degrees=10.0, translate=0.1, scale=(0.9, 1.1), elastic=0.0, elastic_sigma=6.0, generator=None):
    """A different random rotation, shift, scale (and elastic warp) for every image of a float batch (N, 1, H, W).

    Written with affine_grid/grid_sample rather than torchvision.transforms.v2.RandomAffine/ElasticTransform
    because those transforms draw one set of parameters per call, i.e. the same warp for the whole batch.
    elastic > 0 adds a per-image displacement field: uniform noise blurred with torchvision's gaussian_blur
    (sigma elastic_sigma pixels), scaled by elastic pixels. Zero stays zero, so apply it to [0, 1] images
    before normalising.
    """
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    rand = torch.rand(n, 4, device=x.device, generator=generator)
    angle = (rand[:, 0] * 2 - 1) * degrees * torch.pi / 180
    factor = scale[0] + rand[:, 1] * (scale[1] - scale[0])
    shift = (rand[:, 2:] * 2 - 1) * translate * 2  # affine_grid coordinates span [-1, 1], i.e. 2 units
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic:
        noise = torch.rand(n, 2, h, w, device=x.device, generator=generator, dtype=x.dtype) * 2 - 1
        size = 2 * int(2 * elastic_sigma) + 1  # +-2 sigma: the rest of the kernel adds nothing visible
        field = gaussian_blur(noise, size, elastic_sigma) * elastic
        # pixels -> grid units, with Python numbers: a tensor made from a list here would be a host-to-device
        # copy, which a CUDA graph capture cannot take
        grid = grid + torch.stack([field[:, 0] * (2.0 / w), field[:, 1] * (2.0 / h)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def level(augment):
    """A name from AUGMENTATIONS -> its augment_batch arguments; "none" (or False, None) -> None. True is
    "standard": what --augment meant in training states saved by earlier versions."""
    augment = {True: "standard", False: None, "none": None}.get(augment, augment)
    if augment and augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[augment] if augment else None
