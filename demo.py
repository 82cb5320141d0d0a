"""Check that this machine can train and predict: python demo.py

A checklist, one line per check, then "Ready" and the next command to try, or each failure and its fix. Exit code
0 when all pass, 1 otherwise, 2 for bad flags. Only the standard library is imported up here, so with torch
missing the checklist still runs and says so. What each check proves, and why: docs/demo.md.
"""
import argparse
import contextlib
import importlib.metadata
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import (PROJECT_DIR, OneLineParser, atomic_write, device_label, first_line, memory_format, pick_device,
                    project_path, shown_path)  # common imports torch only inside the functions that need it

REQUIREMENTS = PROJECT_DIR / "requirements.txt"
INSTALL_TORCH = "reinstall PyTorch for this machine (https://pytorch.org/get-started/locally/) or use --device cpu"
RESTORE = "restore the project's files (git status shows what changed)"
# The record preset's tiny CNN and peak rate, warmed up and annealed (a constant rate ends 1-2 points lower): a
# pipeline that learns clears 95% on 2,000 images it never saw with room to spare; one that does not, never.
LEARN_MODEL, LEARN_IMAGES, LEARN_BATCH, LEARN_STEPS, LEARN_MAX_LR = "tiny", 6000, 64, 150, 1e-2
HELD_OUT, LEARN_TARGET, SEED = 2000, 0.95, 0
IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn", "pytest-xdist": "xdist"}  # the rest: name, - -> _
EXAMPLES = PROJECT_DIR / "examples"  # pictures as people send them, made from MNIST test digits: see its README


class Failed(Exception):
    """A check that did not pass: Failed(what is wrong, in one line; its fix; what it found anyway, if anything)."""


class Checklist:
    """Runs the checks in order, one line each, and keeps each failure with its fix, and the notes."""
    def __init__(self, out=None):
        self.out, self.start = out or sys.stdout, time.perf_counter()
        self.passed, self.failures, self.notes = {}, [], []

    def say(self, text=""):
        encoding = getattr(self.out, "encoding", None) or "utf-8"  # what it cannot show becomes "?", not a crash
        print(text.encode(encoding, "replace").decode(encoding), file=self.out, flush=True)

    def run(self, name, check, needs=(), fix="pip install --force-reinstall -r requirements.txt", optional=False):
        """check() -> (detail, value): print its line, return value. Failed carries a known problem's own fix;
        anything else is one line with `fix`. An optional check that does not pass is a note, not a failure."""
        blocked, start = [n for n in needs if not self.passed.get(n)], time.perf_counter()
        mark, detail, value = "–", f"not run: needs {', '.join(blocked)}", None
        try:
            if not blocked:
                (detail, value), mark = check(), "✓"
        except Failed as err:  # Failed(detail, fix) or Failed(detail, fix, value)
            mark, (detail, fix, value) = "○" if optional else "✗", (*err.args, None)[:3]
        except Exception as err:  # anything unforeseen is one line and a fix too, never a traceback
            mark, detail = "○" if optional else "✗", f"{type(err).__name__}: {first_line(err)}"
        if mark in ("✗", "○"):
            (self.notes if optional else self.failures).append((name, detail, fix))
        self.passed[name] = mark == "✓"
        took = "" if blocked else f"{time.perf_counter() - start:.1f}s"
        self.say(f"{mark} {took:>6}  {name:<14} {detail}")
        return value


def read_requirements(path=REQUIREMENTS):
    """requirements.txt -> [(Requirement, who alone needs it or None)]. What follows a "# Tests" heading only the
    tests need; a package's own comment may name before a colon the commands that alone need it ("# tune.py:")."""
    from packaging.requirements import Requirement
    found, tests = [], False
    for line in Path(path).read_text().splitlines():
        spec, _, comment = (part.strip() for part in line.partition("#"))
        if not spec and comment:
            tests = comment.lower().startswith("tests")
        elif spec and not spec.startswith("-"):  # -r other.txt, --index-url ...: options, not packages
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate():  # `; sys_platform == "win32"` on Linux: left out
                commands = [w for w in comment.split(":")[0].split() if w.endswith(".py")] if ":" in comment else []
                found.append((req, "the tests" if tests else " and ".join(commands) or None))
    return found


def check_package(req, only=None):
    """Installed (by its metadata), new enough, and importable: a broken binary shows only on import."""
    need = f", for {only} only" if only else ""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version is None or not req.specifier.contains(version, prereleases=True):
        raise Failed(f"{version or 'not'} installed{need}; requirements.txt wants {req}", f"pip install '{req}'")
    module = IMPORT_NAMES.get(req.name.lower(), req.name.lower().replace("-", "_"))
    try:
        importlib.import_module(module)
    except Exception as err:
        raise Failed(f"{version} installed{need}, but `import {module}` fails: {first_line(err)}",
                     f"pip install --force-reinstall '{req}'") from None
    return f"{version} (needs {req.specifier or 'any version'}){need}", None


def check_packages(cl, path=REQUIREMENTS):
    try:
        requirements = read_requirements(path)
    except ImportError:  # packaging reads requirements.txt: without it, likely nothing is installed yet
        return cl.run("packaging", lambda: ("", importlib.import_module("packaging")), fix="pip install packaging")
    for req, only in requirements:  # what only the tests or one command need is optional: a note, not a cross
        cl.run(req.name, lambda r=req, o=only: check_package(r, o), optional=only is not None)


def check_compute(device):
    import torch
    torch.ones(2, device=device).sum().item()  # the first work there: a driver that does not fit torch fails here
    return f"{device_label(device)}; training picks {pick_device('auto')} by default", None


def check_data(data_dir, device):
    import data_loader
    try:
        raw = data_loader.check_mnist(data_dir, full=True)  # every .gz against SHA256SUMS, unpacked if need be
    except data_loader.DataError as err:
        problem, _, fix = str(err).partition("; ")
        raise Failed(problem, fix or RESTORE) from None
    splits = data_loader.get_splits(data_dir, device=device)
    return f"{' + '.join(f'{len(x):,} {n}' for n, (x, _) in splits.items())} images, checksums right, in {raw}", splits


def check_learning(splits, device):
    """A short run of the training command's own step must reach LEARN_TARGET on images it never saw."""
    import torch
    from cnn_pytorch import build_model
    from data_loader import TrainBatches, predict_probs
    from train_pytorch import train_step
    torch.manual_seed(SEED)
    model = build_model(LEARN_MODEL).to(device).to(memory_format=memory_format(device)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARN_MAX_LR / 10)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARN_MAX_LR, total_steps=LEARN_STEPS,
                                                   pct_start=0.15, div_factor=10, final_div_factor=100)
    batches = TrainBatches(*(t[:LEARN_IMAGES] for t in splits["train"]), LEARN_BATCH, augment="none",
                           generator=torch.Generator().manual_seed(SEED), memory_format=memory_format(device))
    for step in range(LEARN_STEPS):
        if step % len(batches) == 0:
            batches.new_epoch()
        x, y = batches.batch(step % len(batches))
        # Full precision: the bf16 autocast that training adds on CUDA comes with its flags (fast_step.py).
        loss, _ = train_step(model, optimizer, x, y, contextlib.nullcontext(), label_smoothing=0.0)
        schedule.step()
    val_x, val_y = (t[:HELD_OUT] for t in splits["val"])
    accuracy = (predict_probs(model, val_x).argmax(1) == val_y).float().mean().item()
    what = f"{LEARN_MODEL} CNN, {LEARN_STEPS} steps: {accuracy:.1%} right on unseen images (needs {LEARN_TARGET:.0%})"
    if not loss.isfinite() or accuracy < LEARN_TARGET:
        raise Failed(f"{what}; last loss {loss.item():.3g}", f"{RESTORE}; if that does not help, {INSTALL_TORCH}")
    return what, model


def check_round_trip(model, device):
    """Saved, and loaded back as predict.py loads it, the model is the trained one: every tensor equal, bit for bit."""
    import torch
    import checkpoint
    import data_loader
    with tempfile.TemporaryDirectory(prefix="mnist-demo-") as work_dir:
        path = Path(work_dir) / "demo.pth"
        checkpoint.save_checkpoint(path, model, LEARN_MODEL, data_loader.NORMALIZATION)
        size, (loaded, ckpt) = path.stat().st_size, checkpoint.load_checkpoint(path, device)
    trained, reloaded = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in trained.keys() | reloaded.keys() if k not in trained or k not in reloaded
                    or not torch.equal(trained[k].cpu(), reloaded[k].cpu()))
    if differ:
        raise Failed(f"{len(differ)} tensors differ after save and load, e.g. {differ[0]}", "restore checkpoint.py")
    return f"{size / 2**20:.1f} MB, all {len(trained)} tensors equal after save and load", (loaded, ckpt)


def check_prediction(model, ckpt, device):
    """The shipped pictures of examples/ (a phone photo, a scan, a drawing on a transparent background, a canvas,
    a thin pen; the true digit ends each name), read by the reloaded model through predict's preprocessing."""
    import torch
    import preprocess
    samples = []
    for path in sorted(EXAMPLES.glob("*_[0-9].*")):
        seen = preprocess.image_to_mnist(path, **ckpt["normalization"])
        with torch.no_grad():
            probs = model(seen.unsqueeze(0).to(device)).softmax(1)[0]
        samples.append((int(path.stem[-1]), path, seen, int(probs.argmax()), float(probs.max())))
    wrong = [f"{path.name} read as {pred}" for digit, path, _, pred, _ in samples if pred != digit]
    what = f"{len(samples) - len(wrong)} of {len(samples)} pictures in {shown_path(EXAMPLES)} read right"
    if wrong or not samples:  # still drawn: the plot shows what the model was given
        raise Failed(f"{what}: {', '.join(wrong) or 'none there'}", f"{RESTORE} (preprocess.py, examples/)", samples)
    return what, samples


def check_plot(samples, save_dir):
    """The pictures as given (top), what the model saw of them and its answer (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from preprocess import mnist_to_image
    fig, axes = plt.subplots(2, len(samples), figsize=(1.6 * len(samples), 3.4), layout="constrained",
                             subplot_kw={"xticks": [], "yticks": []})
    for (top, bottom), (digit, path, seen, pred, prob) in zip(axes.T, samples):
        top.imshow(plt.imread(path), cmap="gray")
        bottom.imshow(mnist_to_image(seen), cmap="gray", vmin=0, vmax=255)
        bottom.set_title(f"says {pred} ({prob:.0%})", fontsize=10, color="darkgreen" if pred == digit else "red")
    save_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path := save_dir / "demo_predictions.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return f"{path} ({len(samples)} pictures)", path


def parse_args(argv=None):
    p = OneLineParser(prog="demo.py", description=__doc__.splitlines()[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:N, mps or cpu")
    p.add_argument("--data_dir", default=str(PROJECT_DIR / "data"), help="where MNIST lives")
    p.add_argument("--save_dir", default="results", help="where demo_predictions.png goes; relative to the project")
    return p, p.parse_args(argv)


def summary(cl):
    seconds, failed = time.perf_counter() - cl.start, len(cl.failures)
    cl.say(f"\n{failed} check{'s' * (failed != 1)} failed ({seconds:.1f}s). To fix:" if failed else
           f"\nReady: this machine can train and predict ({len(cl.passed)} checks in {seconds:.1f}s).")
    for name, detail, fix in cl.failures:
        cl.say(f"  ✗ {name}: {detail}\n      fix: {fix}")
    if cl.notes:  # who needs each is said in its line
        cl.say("Optional, for one command or the tests only: " + "; ".join(f"{n} ({fix})" for n, _, fix in cl.notes))
    predict, examples = (shlex.quote(shown_path(p)) for p in (PROJECT_DIR / "predict.py", EXAMPLES))
    cl.say("Then run `python demo.py` again." if cl.failures else f"Next: python {predict} --image_path {examples}")
    return 1 if cl.failures else 0


def main(argv=None, stream=None):
    cl, (parser, args) = Checklist(stream), parse_args(argv)  # the clock starts before torch is imported
    try:
        device = parser.device(args.device)  # a device that is not here: one line, exit 2
    except Exception:  # torch missing or broken: the package lines say what to do
        device = None
    cl.say("demo.py: can this machine train and predict?")
    cl.run("Python", lambda: (f"{sys.version.split()[0]} at {sys.executable}", None))
    check_packages(cl)
    cl.run("Compute", lambda: check_compute(device), needs=("torch",), fix=INSTALL_TORCH)
    splits = cl.run("Data", lambda: check_data(args.data_dir, device),
                    needs=("Compute", "numpy", "pillow", "matplotlib"))  # what the checks from here on import
    model = cl.run("Learning", lambda: check_learning(splits, device), needs=("Data",), fix=RESTORE)
    loaded = cl.run("Round trip", lambda: check_round_trip(model, device), needs=("Learning",), fix=RESTORE)
    samples = cl.run("Prediction", lambda: check_prediction(*loaded, device), needs=("Round trip",), fix=RESTORE)
    cl.run("Plot", lambda: check_plot(samples, project_path(args.save_dir)), needs=() if samples else ("Prediction",),
           fix="pick a folder you can write to with --save_dir, or reinstall matplotlib")
    return summary(cl)


if __name__ == "__main__":
    sys.exit(main())
