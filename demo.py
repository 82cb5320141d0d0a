"""Check that this machine can train and predict: python demo.py

The first command to run after installing. A checklist, one line per check with a tick or a cross and its
time: Python and every package of requirements.txt (read with `packaging`; those only the tests or one command
need, such as optuna for tune.py, are optional: missing, they get a note naming who needs them and the install
line, not a cross), the compute device, the shipped MNIST, every model of the table, a short training
run that must reach 95% on held-out images, a checkpoint round trip, a prediction from a picture on disk, and a
small plot (results/demo_predictions.png). It ends with "Ready" and the next command to try (the shipped model
reading the example pictures in examples/), or with what failed and the fix for each. Exit code 0 when all
pass, 1 otherwise, 2 for bad flags.
About 12 s on a 2-core CPU, most of it importing every package it checks.

Only the standard library is imported up here: with torch missing, the checklist must still run and say so.
This file owns the checklist; it trains and predicts through the project's modules and must not change them.
"""
import argparse
import functools
import importlib
import importlib.metadata
import itertools
import math
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from common import PROJECT_DIR, first_line, shown_path  # the standard library only: safe without torch

REQUIREMENTS = PROJECT_DIR / "requirements.txt"
TEST_SECTION = "tests"  # requirements.txt's "# Tests" section: packages only the test suite needs
# The command to try after a pass: the shipped model reading the shipped example pictures (no training needed).
NEXT_SCRIPT, NEXT_FLAG, NEXT_FOLDER = PROJECT_DIR / "predict.py", "--image_path", PROJECT_DIR / "examples"
MIN_PYTHON = (3, 9)  # the oldest Python that torch>=2.6 (requirements.txt) supports

# Distributions whose import name is not their name on PyPI (the rest import as the name, '-' -> '_').
IMPORT_NAMES = {"scikit-learn": "sklearn", "pillow": "PIL"}
# The packages every check past the package lines needs; a check is not run when one of its needs failed.
CORE = ("torch", "torchvision", "numpy", "pillow")

# The learning check, in one visible block: the tiny CNN (the record preset's model), which learns the lesson in
# less than half of simple's time on a CPU. Measured with seeds 0, 1, 2 on one thread: 97.3%, 97.6%, 97.3% on the
# 2,000 held-out images in 4.3-5.4 s (simple's 250 steps: 97.5% in 11.5 s); 2.5 s on a quiet 2-core CPU. A
# pipeline that does not learn stays far below the bar.
LEARN_MODEL = "tiny"
LEARN_TRAIN_IMAGES = 6000  # the first 6,000 of the training split
LEARN_STEPS = 150          # batches of 64, no augmentation: about 1.6 passes over those images
LEARN_BATCH = 64
LEARN_MAX_LR = 1e-2        # Adam, warm-up over 15% of the steps to 1e-2 (the record preset's peak), cosine decay
LEARN_HELD_OUT = 2000      # scored on the first 2,000 validation images, never trained on
LEARN_TARGET = 0.95
SEED = 0

# The prediction check: one test digit per class, drawn as a person would hand it over.
CANVAS = (320, 240)        # a white page ...
DIGIT_SIDE = 112           # ... with the digit enlarged 4x, dark ink, away from the centre
PREDICT_MIN_RIGHT = 9      # of the 10 digits (why not 10: see check_prediction)

# The round trip: the saved tensors must equal the trained ones exactly; the logits of the two models (same
# weights, same memory format, same input) may differ only by the device's rounding, relative to the largest
# logit. On the CPU the same kernels run on both sides, so the difference is 0 in practice. On CUDA, cuDNN may
# pick another algorithm for the second model and runs convolutions in TF32 (10-bit mantissa, ~5e-4 relative
# per product) by default; MPS has its own kernels. A broken load changes logits by far more than either.
LOGITS_RTOL = {"cpu": 1e-5}
LOGITS_RTOL_ACCELERATOR = 1e-3

REINSTALL = "pip install --force-reinstall -r requirements.txt"


class Failed(Exception):
    """A check that did not pass: what is wrong (one line), what to do about it, and what it found anyway."""

    def __init__(self, detail, fix=None, value=None):
        super().__init__(detail)
        self.detail, self.fix, self.value = detail, fix, value


# --------------------------------------------------------------------------------------------------------------
# The checklist: runs checks in order, prints one line each, remembers what failed and how to fix it.
# --------------------------------------------------------------------------------------------------------------

def pick_marks(stream):
    """Tick, cross and dash where the terminal can print them; plain words where it cannot (e.g. a cp1252 pipe)."""
    try:
        "✓✗–○".encode(getattr(stream, "encoding", None) or "ascii")
        return {"pass": "✓", "fail": "✗", "skip": "–", "note": "○"}
    except (UnicodeEncodeError, LookupError):
        return {"pass": "ok", "fail": "FAIL", "skip": "skip", "note": "opt"}


class Checklist:
    def __init__(self, stream=None):
        self.out = stream or sys.stdout
        self.marks = pick_marks(self.out)
        self.width = max(len(m) for m in self.marks.values())
        self.passed = {}     # check name -> True/False
        self.failures = []   # (name, detail, fix)
        self.skipped = []    # names not run because something they need failed
        self.notes = []      # (name, detail, fix) of optional checks that did not pass: said, but not a failure

    def say(self, text=""):
        try:
            print(text, file=self.out, flush=True)
        except UnicodeEncodeError:  # a path or message with characters this terminal cannot show
            encoding = getattr(self.out, "encoding", None) or "ascii"
            print(text.encode(encoding, "replace").decode(encoding), file=self.out, flush=True)

    def line(self, kind, name, detail, seconds):
        took = f"{seconds:5.1f}s" if seconds is not None else " " * 6
        self.say(f"{self.marks[kind]:<{self.width}} {took}  {name:<14} {detail}")

    def run(self, name, check, needs=(), fix=REINSTALL, optional=False):
        """Run check() -> (detail, value); print its line; return value (None when skipped; a failed check may
        still hand on what it found, as Failed(..., value=...)).

        `fix` is the advice for an unexpected exception; a check raises Failed(detail, fix) for the known ones.
        An optional check that does not pass is a note (its own mark, listed at the end), never a failure.
        """
        blocked = [n for n in needs if not self.passed.get(n)]
        if blocked:
            self.passed[name] = False
            self.skipped.append(name)
            self.line("skip", name, f"not run: needs {', '.join(blocked)}", None)
            return None
        start = time.perf_counter()
        try:
            detail, value = check()
        except Failed as err:
            detail, fix, value = err.detail, err.fix or fix, err.value
        except Exception as err:  # anything else still ends as one line and a fix, never a traceback
            detail, value = f"{type(err).__name__}: {first_line(err)}", None
        else:
            fix = None
        seconds = time.perf_counter() - start
        self.passed[name] = fix is None
        if fix is not None:
            (self.notes if optional else self.failures).append((name, detail, fix))
        self.line("pass" if fix is None else "note" if optional else "fail", name, detail, seconds)
        return value


# --------------------------------------------------------------------------------------------------------------
# Python and packages
# --------------------------------------------------------------------------------------------------------------

class Package(NamedTuple):
    """One line of requirements.txt: the distribution, its specifier ('>=2.6', or '' for any), its section
    ('runtime', 'commands', 'tests') and the commands that alone need it (empty: every command does)."""
    name: str
    spec: str
    section: str
    commands: tuple


def parse_requirements(path=REQUIREMENTS):
    """requirements.txt -> [Package], read by `packaging` (pip's own parser), blanks and options skipped.

    A comment on a line of its own starts a section, named by its first word in lower case ("# Runtime: ...",
    "# Tests" -> 'runtime', 'tests'). A package's own comment may name, before its first colon, the commands
    that alone need it ("optuna>=4.0  # tune.py: ..." -> ('tune.py',)).
    """
    from packaging.requirements import Requirement
    found, section = [], ""
    for raw in Path(path).read_text().splitlines():
        line, _, comment = raw.partition("#")
        if not line.strip():
            if comment.strip():
                section = (re.findall(r"[A-Za-z0-9_-]+", comment) or [section])[0].lower()
            continue
        if line.strip().startswith("-"):  # -r other.txt, --index-url ...: not a package
            continue
        req = Requirement(line.strip())
        if req.marker is not None and not req.marker.evaluate():  # e.g. ; sys_platform == "darwin"
            continue
        head, colon, _ = comment.partition(":")
        commands = tuple(re.findall(r"[\w-]+\.py\b", head)) if colon else ()
        found.append(Package(req.name, str(req.specifier), section, commands))
    return found


def satisfies(version, spec):
    """True when an installed version meets a specifier such as '>=2.6' or '>=1.3,<2' (PEP 440, by packaging)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except InvalidVersion:  # a version pip itself could not compare: nothing to hold against it
        return True


@functools.cache
def installed_modules():
    """importlib.metadata.packages_distributions(), read once: it scans every installed package (0.2 s a call
    here), and import_name asks it for every line of requirements.txt."""
    return importlib.metadata.packages_distributions()


def import_name(dist):
    """The module a distribution is imported as: its own name (torch), a known other name (pillow -> PIL), else
    the one module the installed package's records give (pytest-xdist -> xdist)."""
    usual = IMPORT_NAMES.get(dist.lower(), dist.lower().replace("-", "_"))
    modules = [m for m, dists in installed_modules().items()
               if dist.lower() in (d.lower() for d in dists) and not m.startswith("_")]
    return usual if usual in modules or len(modules) != 1 else modules[0]


def check_python():
    found = ".".join(map(str, sys.version_info[:3]))
    wanted = ".".join(map(str, MIN_PYTHON))
    if sys.version_info[:2] < MIN_PYTHON:
        raise Failed(f"{found} is too old (needs >= {wanted})",
                     f"install Python {wanted} or newer, then `pip install -r requirements.txt` in it")
    return f"{found} (needs >= {wanted}) at {sys.executable}", None


def check_package(dist, spec, only=None):
    """Installed (by its metadata), new enough, and importable (a broken binary shows up only on import).

    `only` names who alone needs it ("the tests", "tune.py"): said in the line, so a note is read as such.
    """
    install = f"pip install '{dist}{spec}'"
    plural = only == "the tests" or " and " in (only or "")
    need = f"; only {only} need{'' if plural else 's'} it" if only else ""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise Failed(f"not installed{need.replace(';', ':', 1)} (requirements.txt: {dist}{spec})", install) from None
    if spec and not satisfies(version, spec):
        raise Failed(f"{version} installed, too old (needs {spec}){need}", f"pip install --upgrade '{dist}{spec}'")
    module = import_name(dist)
    try:
        importlib.import_module(module)
    except Exception as err:
        raise Failed(f"{version} installed, but `import {module}` fails ({first_line(err)}){need}",
                     f"pip install --force-reinstall '{dist}{spec}'") from None
    return f"{version} (needs {spec or 'any version'}){'; for ' + only if only else ''}", None


def needed_by(package):
    """Who alone needs a package: "the tests", "tune.py", "export.py and predict.py"; None for every command."""
    if package.section == TEST_SECTION:
        return "the tests"
    return " and ".join(package.commands) or None


def check_packages(cl, path=REQUIREMENTS):
    """One line per package of requirements.txt. Those that only the tests or one command need are optional:
    missing or broken, they are a note naming who needs them and the install, not a failure."""
    try:
        packages = parse_requirements(path)
    except ImportError:  # packaging comes with matplotlib (and pip): without it, requirements.txt is unread
        cl.run("packaging", lambda: check_package("packaging", ""), fix="pip install -r requirements.txt")
        return
    for package in packages:
        only = needed_by(package)
        cl.run(package.name, lambda p=package, o=only: check_package(p.name, p.spec, o),
               fix=f"pip install --force-reinstall '{package.name}{package.spec}'", optional=only is not None)


# --------------------------------------------------------------------------------------------------------------
# Compute, data, models
# --------------------------------------------------------------------------------------------------------------

def describe_compute(device):
    import torch
    from common import pick_device
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        found = f"CUDA {props.name} ({props.total_memory / 2**30:.0f} GiB)"
        if torch.cuda.device_count() > 1:
            found += f" x {torch.cuda.device_count()}"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found = "MPS (Apple GPU)"
    else:
        found = "no GPU (no CUDA, no MPS)"
    found += f"; CPU {torch.get_num_threads()} threads"
    # A first operation on the device: a CUDA driver that does not match this PyTorch build fails here.
    a = [[4.0 * i + j for j in range(4)] for i in range(4)]
    expected = sum(a[i][k] * a[k][j] for i in range(4) for j in range(4) for k in range(4))
    if (torch.tensor(a, device=device) @ torch.tensor(a, device=device)).sum().item() != expected:
        raise Failed(f"a 4x4 matrix product on {device} gives a wrong result",
                     "reinstall PyTorch for this machine (https://pytorch.org/get-started/locally/)")
    default = pick_device("auto")
    using = f"training uses {default} by default" + (f"; checking {device}" if device != default else "")
    return f"{found}; {using}", None


def check_data(data_dir, device):
    import data_loader
    raw_dir = Path(data_dir) / "MNIST" / "raw"
    try:
        found = data_loader.check_mnist(data_dir)  # checksums, and unpacks the shipped .gz files
        data_loader.verify_shipped(data_dir)
    except data_loader.DataError as err:
        problem, _, fix = str(err).partition("; ")
        raise Failed(problem, fix or "restore the shipped copy: git checkout -- data/MNIST/raw") from None
    if found is None:
        raise Failed(f"MNIST is not in {raw_dir}", "restore the shipped copy: git checkout -- data/MNIST/raw "
                     "(or let `python train_pytorch.py` download it)")
    splits = data_loader.get_splits(data_dir, device=device)
    n_train = len(splits["train"][0]) + len(splits["val"][0])
    n_test = len(splits["test"][0])
    if (n_train, n_test) != (data_loader.TRAIN_SIZE, data_loader.TEST_SIZE):
        raise Failed(f"{n_train:,} training and {n_test:,} test images, expected "
                     f"{data_loader.TRAIN_SIZE:,} and {data_loader.TEST_SIZE:,}",
                     "delete the unpacked *-ubyte files in data/MNIST/raw and run again")
    return f"{n_train:,} training + {n_test:,} test images, checksums right, in {raw_dir}", splits


def check_model(name, device):
    """Builds; a forward and backward pass on the device gives finite logits of the right shape and finite grads."""
    import torch
    import torch.nn.functional as F
    from cnn_pytorch import CLASSES, build_model, count_parameters
    torch.manual_seed(SEED)
    model = build_model(name).to(device).train()
    x = torch.randn(8, 1, 28, 28, device=device)
    logits = model(x)
    if tuple(logits.shape) != (8, len(CLASSES)):
        raise Failed(f"{name}: logits of shape {tuple(logits.shape)}, expected (8, {len(CLASSES)})",
                     "restore cnn_pytorch.py: git checkout -- cnn_pytorch.py")
    F.cross_entropy(logits, torch.arange(8, device=device)).backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if not (torch.isfinite(logits).all() and grads_finite):
        raise Failed(f"{name}: NaN or inf in the forward or backward pass on {device}",
                     f"reinstall PyTorch ({REINSTALL}) or try another --device")
    return f"{count_parameters(model):,} parameters; forward and backward on {device} finite", None


# --------------------------------------------------------------------------------------------------------------
# Learning, round trip, prediction, plot
# --------------------------------------------------------------------------------------------------------------

def _forever(batches):
    while True:
        yield from batches


def check_learning(splits, device):
    """A short training run on a subset must reach LEARN_TARGET on held-out images: the pipeline learns."""
    import torch
    import torch.nn.functional as F
    import data_loader
    from cnn_pytorch import build_model
    from data_loader import predict_probs
    torch.manual_seed(SEED)
    train_x, train_y = (t[:LEARN_TRAIN_IMAGES] for t in splits["train"])
    val_x, val_y = (t[:LEARN_HELD_OUT] for t in splits["val"])
    model = build_model(LEARN_MODEL).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARN_MAX_LR / 10)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARN_MAX_LR, total_steps=LEARN_STEPS,
                                                   pct_start=0.15, div_factor=10, final_div_factor=100)
    batches = data_loader.DeviceBatches(train_x, train_y, LEARN_BATCH, shuffle=True, drop_last=True,
                                        generator=torch.Generator().manual_seed(SEED))
    model.train()
    for x, y in itertools.islice(_forever(batches), LEARN_STEPS):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    accuracy = (predict_probs(model, val_x).argmax(1) == val_y).float().mean().item()
    what = (f"{LEARN_MODEL} CNN, {LEARN_STEPS} steps on {len(train_x):,} images: {accuracy * 100:.1f}% on "
            f"{len(val_x):,} held-out images (needs >= {LEARN_TARGET * 100:.0f}%)")
    if not math.isfinite(loss.item()):
        raise Failed(f"training diverged (loss {loss.item()}) on {device}",
                     f"reinstall PyTorch ({REINSTALL}) or try another --device")
    if accuracy < LEARN_TARGET:
        raise Failed(what, f"the pipeline runs but does not learn: restore the project files (git status shows "
                           f"what changed) and reinstall PyTorch ({REINSTALL})")
    return what, model


def logits_rtol(device):
    """How far apart, relative to the largest logit, two models with equal weights may be on this device."""
    import torch
    return LOGITS_RTOL.get(torch.device(device).type, LOGITS_RTOL_ACCELERATOR)


def check_round_trip(model, sample, device, work_dir):
    """Saved as a checkpoint and loaded back (the way predict.py loads it), the model is the trained one: every
    tensor of its state equal, bit for bit, and the same logits up to the device's rounding."""
    import torch
    import data_loader
    import checkpoint
    restore = "restore checkpoint.py (git diff checkpoint.py shows what changed; git checkout -- checkpoint.py)"
    path = Path(work_dir) / f"demo_{LEARN_MODEL}.pth"
    checkpoint.save_checkpoint(path, model, LEARN_MODEL, data_loader.NORMALIZATION, note="written by demo.py")
    loaded, ckpt = checkpoint.load_checkpoint(path, device)
    trained, reloaded = model.state_dict(), loaded.state_dict()
    if trained.keys() != reloaded.keys():
        odd = sorted(set(trained) ^ set(reloaded))
        raise Failed(f"the loaded model's tensors are not the trained one's ({len(odd)} names differ, e.g. "
                     f"{odd[0]})", restore)
    changed = [k for k in trained if not torch.equal(trained[k].cpu(), reloaded[k].cpu())]
    if changed:
        raise Failed(f"{len(changed)} of {len(trained)} tensors differ from the trained ones after save and load "
                     f"(first: {changed[0]})", restore)
    # Both sides in the trained model's memory format (channels-last), so they run the same kernels.
    model.eval().to(memory_format=torch.channels_last)
    loaded.to(memory_format=torch.channels_last)
    x = data_loader.normalize(sample).to(device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before, after = model(x).float(), loaded(x).float()
    diff = (before - after).abs().max().item()
    scale = max(1.0, before.abs().max().item())
    rtol = logits_rtol(device)
    if not diff <= rtol * scale:  # `not <=`: a NaN fails too
        raise Failed(f"the same weights give logits up to {diff:.2e} apart after save and load (allowed on "
                     f"{torch.device(device).type}: {rtol:.0e} x {scale:.1f}): the model is rebuilt differently "
                     f"from the one trained", restore)
    size = path.stat().st_size / 2**20
    return (f"{size:.1f} MB checkpoint: all {len(trained)} tensors equal; {len(x)} images: logits within "
            f"{diff:.1e} (allowed {rtol:.0e} x {scale:.1f})"), (loaded, ckpt)


def user_picture(digit, index):
    """An MNIST digit (28x28 uint8, white on black) as a person would hand it over: dark ink on a white page,
    enlarged 4x, somewhere off the centre (a different spot for every index)."""
    from PIL import Image
    ink = Image.fromarray(digit, "L").resize((DIGIT_SIDE, DIGIT_SIDE), Image.Resampling.BICUBIC)
    dark = ink.point(lambda v: 255 - v * 225 // 255)  # ink at grey 30 on white paper
    page = Image.new("L", CANVAS, 255)
    left = 12 + (index * 67) % (CANVAS[0] - DIGIT_SIDE - 24)
    top = 8 + (index * 41) % (CANVAS[1] - DIGIT_SIDE - 16)
    page.paste(dark, (left, top))
    return page.convert("RGB")  # most pictures people send are RGB


def pick_digits(model, test_x, test_y):
    """One test image per class that the model reads right, and confidently, in its plain MNIST form."""
    from data_loader import predict_probs
    probs = predict_probs(model, test_x[:1000])
    chosen = []
    for digit in range(10):
        right = ((test_y[:1000] == digit) & (probs.argmax(1) == digit)).nonzero().flatten()
        sure = right[probs[right, digit] >= 0.9]
        pool = sure if len(sure) else right
        if len(pool):
            chosen.append(int(pool[0]))
    return chosen


def check_prediction(model, ckpt, splits, work_dir):
    """Pictures written to disk as PNG, read back through predict's preprocessing, classified by the loaded model.

    The digits are ones the model already reads right as plain MNIST, so a miss here points at the way a
    picture becomes an MNIST digit (inversion, cropping, scaling, centring), not at the model. The 4x
    enlargement and the resampling back down are not pixel-exact, so one borderline digit in ten may flip;
    a broken step (say, no inversion) misreads most of them. Hence 9 of 10.
    """
    import torch
    import preprocess
    test_x, test_y = (t.cpu() for t in splits["test"])
    device = next(model.parameters()).device
    mean, std = ckpt["normalization"]["mean"], ckpt["normalization"]["std"]
    samples = []
    for n, i in enumerate(pick_digits(model, test_x.to(device), test_y.to(device))):
        label = int(test_y[i])
        path = Path(work_dir) / f"digit_{n}.png"
        user_picture(test_x[i].numpy(), n).save(path)
        try:
            seen = preprocess.image_to_mnist(path, mean, std)
        except preprocess.ImageError as err:
            samples.append({"label": label, "picture": path, "seen": None, "pred": None, "prob": 0.0,
                            "error": str(err)})
            continue
        with torch.no_grad():
            probs = model(seen.unsqueeze(0).to(device)).softmax(1)[0].cpu()
        samples.append({"label": label, "picture": path, "seen": seen, "pred": int(probs.argmax()),
                        "prob": float(probs.max()), "error": None})
    right = sum(s["pred"] == s["label"] for s in samples)
    what = (f"{right}/{len(samples)} digits right, written as dark-on-white off-centre PNGs and read back "
            f"(needs >= {PREDICT_MIN_RIGHT})")
    errors = [s["error"] for s in samples if s["error"]]
    if errors:
        what += f"; unreadable: {errors[0]}"
    if right < PREDICT_MIN_RIGHT:
        raise Failed(what, "turning a picture into an MNIST digit (preprocess.image_to_mnist) is broken: "
                           "restore preprocess.py (git checkout -- preprocess.py) and reinstall pillow and numpy",
                     value=samples)  # still drawn: the plot shows what the model was given
    return what, samples


def draw_predictions(samples, path):
    """Top row: the pictures as written to disk; bottom row: what the model saw, with its answer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    import preprocess
    from common import atomic_write
    n = len(samples)
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n, 3.6), layout="constrained", squeeze=False)
    try:
        for ax, s in zip(axes.T, samples):
            ax[0].imshow(Image.open(s["picture"]).convert("L"), cmap="gray", vmin=0, vmax=255)
            ax[0].set_title(f"a {s['label']}, as a PNG", fontsize=10)
            if s["seen"] is not None:
                ax[1].imshow(preprocess.mnist_to_image(s["seen"]), cmap="gray", vmin=0, vmax=255)
            right = s["pred"] == s["label"]
            answer = f"says {s['pred']} ({s['prob'] * 100:.0f}%)" if s["pred"] is not None else "unreadable"
            ax[1].set_title(answer, fontsize=10, color="darkgreen" if right else "tab:red",
                            fontweight="normal" if right else "bold")
            for a in ax:
                a.set_xticks([])
                a.set_yticks([])
        axes[0, 0].set_ylabel("picture on disk", fontsize=10)
        axes[1, 0].set_ylabel("model input", fontsize=10)
        fig.suptitle("demo.py: digits saved as a user would send them, read back and classified", fontsize=12)
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return path


def check_plot(samples, save_dir):
    path = Path(save_dir) / "demo_predictions.png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_predictions(samples, path)
    except OSError as err:
        raise Failed(f"cannot write {path} ({err.strerror or first_line(err)})",
                     "pick a folder you can write to with --save_dir") from None
    return f"{path} ({len(samples)} digits)", path


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    try:
        import torch  # noqa: F401  (without torch: plain argparse)
        from common import OneLineParser as Parser
    except ImportError:  # torch missing: plain argparse; the package lines will say what to install
        Parser = argparse.ArgumentParser
    p = Parser(prog="demo.py", description=__doc__.splitlines()[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="device to check: auto (cuda, then mps, then cpu, as training picks), cuda, cuda:N, mps, cpu")
    p.add_argument("--data_dir", "--data-dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    p.add_argument("--save_dir", "--save-dir", default="results",
                   help="where demo_predictions.png goes (relative paths are taken from the project folder)")
    return p, p.parse_args(argv)


def resolve_device(parser, name):
    """The device to check, or a one-line error and exit 2; None when torch cannot be imported at all."""
    if not hasattr(parser, "device"):  # torch could not be imported: a plain argparse parser
        return None
    return parser.device(name)


def next_command():
    """What to try after a pass: the shipped model reads the shipped example pictures."""
    return " ".join(["python", shlex.quote(shown_path(NEXT_SCRIPT)), NEXT_FLAG,
                     shlex.quote(shown_path(NEXT_FOLDER))])


def summary(cl, seconds):
    optional = ""
    if cl.notes:  # optional packages: who needs each is in its line's detail
        optional = "Optional, for one command or the tests only: " + "; ".join(
            f"{name} ({fix})" for name, _, fix in cl.notes)
    if not cl.failures and not cl.skipped:
        passed = sum(cl.passed.values())
        cl.say(f"\nReady: this machine can train and predict ({passed} checks passed in {seconds:.1f}s).")
        if optional:
            cl.say(optional)
        cl.say(f"Next: {next_command()}")
        return 0
    cl.say(f"\n{len(cl.failures)} check{'s' * (len(cl.failures) != 1)} failed ({seconds:.1f}s). To fix:")
    for name, detail, fix in cl.failures:
        cl.say(f"  {cl.marks['fail']} {name}: {detail}\n      fix: {fix}")
    try:
        packages = {p.name for p in parse_requirements()}
    except ImportError:
        packages = {"packaging"}
    if any(name in packages for name, _, _ in cl.failures):
        cl.say("  (or install every package at once: pip install -r requirements.txt)")
    if cl.skipped:
        cl.say(f"  not run because of these: {', '.join(cl.skipped)}")
    if optional:
        cl.say(optional)
    cl.say("Then run `python demo.py` again.")
    return 1


def main(argv=None, stream=None):
    start = time.perf_counter()
    parser, args = parse_args(argv)
    device = resolve_device(parser, args.device)
    save_dir = Path(args.save_dir)
    save_dir = save_dir if save_dir.is_absolute() else PROJECT_DIR / save_dir
    cl = Checklist(stream)
    cl.say("demo.py: can this machine train and predict? (about 12 s on a 2-core CPU)")

    cl.run("Python", check_python, fix="install a newer Python")
    check_packages(cl)
    if device is None:  # torch not importable: nothing past this point can run
        device = "none"
    cl.run("Compute", lambda: describe_compute(device), needs=("torch",),
           fix="reinstall PyTorch for this machine (https://pytorch.org/get-started/locally/) or use --device cpu")
    splits = cl.run("Data", lambda: check_data(args.data_dir, device), needs=CORE + ("Compute",),
                    fix="restore the shipped copy: git checkout -- data/MNIST/raw")
    if cl.passed.get("Compute"):
        for name in _model_names():
            cl.run(f"Model {name}", lambda n=name: check_model(n, device),
                   fix="restore cnn_pytorch.py: git checkout -- cnn_pytorch.py")
    else:
        cl.run("Models", None, needs=("Compute",))  # one "not run" line instead of one per model
    model = cl.run("Learning", lambda: check_learning(splits, device), needs=("Data", f"Model {LEARN_MODEL}"))
    with tempfile.TemporaryDirectory(prefix="mnist-demo-") as work_dir:
        loaded = cl.run("Round trip", lambda: check_round_trip(model, splits["val"][0][:256], device, work_dir),
                        needs=("Learning",))
        samples = cl.run("Prediction", lambda: check_prediction(*loaded, splits, work_dir),
                         needs=("Round trip",))
        cl.run("Plot", lambda: check_plot(samples, save_dir), needs=("matplotlib",) if samples else ("Prediction",),
               fix="reinstall matplotlib: pip install --force-reinstall matplotlib")
    return summary(cl, time.perf_counter() - start)


def _model_names():
    from cnn_pytorch import MODELS
    return list(MODELS)


if __name__ == "__main__":
    sys.exit(main())
