"""What every command shares: the one-line error and exit, the device choice, the output folder, atomic writes,
and PROJECT_DIR (the folder of the scripts, from which every relative path is resolved).

Nothing here knows about MNIST or models; every other module may import it, it imports none of them.
"""
import argparse
import os
import sys
import secrets
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent


def first_line(err, limit=200):
    """An exception's first line, at most `limit` characters, for a one-line message; else its type's name."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__


def print_error(prog, message):
    """The project's one error line, `<prog>: error: <message>`, on stderr: what is wrong and what to do."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)


def fail(prog, message, code=1):
    """print_error, then exit with `code` (2: bad flags or an unusable file; 1: the work itself failed)."""
    print_error(prog, message)
    raise SystemExit(code)


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default once: argparse's own, unless the help text already says it, or the
    default is None (the help then says what happens without the flag)."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, not usage plus the error; --help shows
    each default once (DefaultsOnce)."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = DefaultsOnce
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(self.prog, f"{message} (see --help)", 2)

    def device(self, name):
        """pick_device(name), or this parser's one-line error and exit 2 for a device that is not there."""
        try:
            return pick_device(name)
        except ValueError as err:
            self.error(str(err))

    def output_dir(self, path, flag="--save_dir"):
        """writable_dir(path), or this parser's one-line error and exit 2."""
        try:
            return writable_dir(path, flag)
        except OSError as err:
            self.error(str(err))


def at_least(low, kind=int):
    """An argparse type: a `kind` number no lower than `low`; argparse turns a bad value into the one-line error."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not value >= low:  # also refuses NaN
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def positive(text):
    """An argparse type: a number above 0, such as a learning rate."""
    value = at_least(0.0, float)(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0, got 0")
    return value


def fraction(text):
    """An argparse type: a number from 0 up to (not including) 1, such as a dropout or a decay."""
    value = at_least(0.0, float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def pick_device(name):
    """auto -> cuda, then mps, then cpu. Asking for a device that is not there is an error, not a fallback."""
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but this PyTorch sees no CUDA GPU: use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps asked for, but MPS is not available: use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported --device {name!r}: use auto, cuda, mps or cpu")
    return device


def cpu_name():
    """The CPU's model name as Linux reports it (timings say which machine made them), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def device_label(device):
    """The device as a run reports it: which GPU, or how many CPU threads."""
    import torch
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def memory_format(device):
    """The layout of the images and weights a model trains on: channels_last, what cuDNN's and oneDNN's fastest
    convolutions want, except on Apple's MPS, where BatchNorm2d's backward with it gives wrong gradients in
    older torch releases (pytorch/pytorch issue 175189; docs/train.md)."""
    import torch
    return torch.contiguous_format if torch.device(device).type == "mps" else torch.channels_last


def random_state(device):
    """Every random generator a run on `device` draws from: the CPU's, and the GPU's (CUDA or MPS)."""
    import torch
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.device(device).type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_random_state(state, device):
    """Put back what random_state() took; a GPU's state is skipped where this machine has no such GPU."""
    import torch
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.device(device).type == "mps":
        torch.mps.set_rng_state(state["mps"])


def synchronize(device):
    """Wait for the GPU to finish what it was given (a clock must not stop while kernels still run)."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def project_path(path):
    """A relative output path is taken from the project folder, so results land in one place wherever you are."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_DIR / path


def writable_dir(path, flag="--save_dir"):
    """The folder for a command's output, created if needed and proven writable; OSError with one line if not."""
    path = project_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"cannot write to {flag} {path} ({err.strerror or type(err).__name__}): pick a folder you "
                      f"can write to") from None
    return path


def shown_path(path):
    """A project path as the person types it from where they are: relative below the current folder, else
    absolute, so a command printed for them works as printed wherever they started the program."""
    path = Path(path).resolve()
    try:
        shown = str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        shown = str(path)
    return shown + os.sep if path.is_dir() else shown


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; when the block ends, fsync it and rename it over `path`.

    Every file the project writes goes through here, so a crash or Ctrl-C at any moment leaves either the old
    file or the new one, never half of one, and no temporary file behind:

        with atomic_write(out / "report.txt") as tmp:
            tmp.write_text(text)

    The temporary name keeps the suffix (matplotlib and torch.export pick the format from it) and lives in
    the same folder, since a rename is only atomic within one file system.
    """
    path = Path(path)
    # Not mkstemp: the writer creates the file, so it gets the usual permissions rather than mkstemp's 0600.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it the real file
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX); Windows cannot open a folder, and does not need to."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    with suppress(OSError):
        os.fsync(fd)
    os.close(fd)
