"""The README's commands, run verbatim on a fresh copy of the project, in the order shown: the README cannot
drift from the code.

Every ```bash block of the README's "Quick start" and of its "predict.py" section is read, line by line
(a trailing backslash continues a line), and each command is run by bash in a copy of the project made the way
a clone would be: the files `git ls-files` names, tracked or untracked-but-not-ignored, so work not committed
yet is tested too, and nothing a run wrote (results/, the unpacked MNIST) comes along. `python` is the
interpreter running this test. Two kinds of line are not run, and are named in SKIPPED: `pip install`
(the packages are those of the environment running this test) and `python -m pytest` (the suite this test is
part of). Training commands run as written plus TRAIN_SHORTENING, flags appended here; the README itself is
never edited to make them shorter.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTIONS = ("Quick start", "predict.py")  # the sections whose ```bash blocks are run, in this order
TRAIN_SHORTENING = ["--epochs", "1", "--train_subset", "3000", "--no_progress"]  # argparse: the last flag wins
SKIPPED = {
    "pip install": "installs packages; the test uses the environment it runs in",
    "python -m pytest": "the test suite itself, which this test is part of",
}


def section(text, title):
    """The body of the README section whose heading is `title` (any level), up to the next heading of the same
    or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = re.match(r"(#+) (.*)$", line)
        if heading and heading.group(2).strip() == title:
            level = len(heading.group(1))
            body = []
            for later in lines[i + 1:]:
                other = re.match(r"(#+) ", later)
                if other and len(other.group(1)) <= level:
                    break
                body.append(later)
            return "\n".join(body)
    raise AssertionError(f"README.md has no section {title!r}")


def bash_commands(text):
    """The commands of every ```bash block in `text`: one per line, backslash continuations joined; blank lines
    and comment lines left out. A fence inside a block (```text etc.) is not a bash block."""
    commands, inside, pending = [], False, ""
    for line in text.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            inside = not inside and fence.group(1) == "bash"
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def readme_commands():
    text = README.read_text()
    return [(title, command) for title in SECTIONS for command in bash_commands(section(text, title))]


def skip_reason(command):
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def as_run(command):
    """The command bash runs: verbatim, or a training command with TRAIN_SHORTENING appended (before any comment)."""
    argv = shlex.split(command, comments=True)
    if argv[:2] == ["python", "train_pytorch.py"]:
        return shlex.join(argv + TRAIN_SHORTENING)
    return command


def fresh_copy(dest):
    """The project as a clone of this working tree would be: tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not part of the copy
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh copy of the project, and an environment whose `python` is this interpreter."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the copy is made from `git ls-files`")
    dest = fresh_copy(tmp_path_factory.mktemp("fresh_clone"))
    shim = tmp_path_factory.mktemp("bin")
    (shim / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1")
    return dest, env


def run(project, command, timeout=300):
    dest, env = project
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=dest, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{time.perf_counter() - start:6.1f}s  {shlex.join(shlex.split(command, comments=True))}")
    assert done.returncode == 0, f"`{command}` exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def digits_read(stdout):
    """[(digit in the file name, digit read)] from predict.py's lines such as `examples/photo_7.jpg: 7 (100.0%)`."""
    return re.findall(r"_(\d)\.\w+: (\d) \(", stdout)


def test_the_readme_shows_the_commands_this_test_runs():
    """The extraction finds what a reader sees, so an empty or garbled read cannot pass for a working README."""
    quick = [shlex.split(c, comments=True) for title, c in readme_commands() if title == "Quick start"]
    assert quick[0] == ["pip", "install", "-r", "requirements.txt"] and quick[-1] == ["python", "-m", "pytest"]
    assert [argv[1] for argv in quick[1:-1]] == ["demo.py", "predict.py", "train_pytorch.py", "predict.py"]
    assert quick[2] == ["python", "predict.py", "--image_path", "examples/"]
    assert all(skip_reason(c) is None for title, c in readme_commands() if title != "Quick start")


def test_quick_start_runs_verbatim_on_a_fresh_copy(project):
    """In order: demo passes and its next command works; predict reads the examples with the shipped model;
    training writes results/; predict then uses that model."""
    dest, _ = project
    trained = dest / "results" / "best_model_simple_pt.pth"
    for title, command in readme_commands():
        if title != "Quick start":
            continue
        if skip_reason(command):
            print(f"skipped  {command}  ({skip_reason(command)})")
            continue
        done = run(project, as_run(command))
        script = shlex.split(command, comments=True)[1]
        if script == "demo.py":
            lines = done.stdout.splitlines()
            assert any(line.startswith("Ready") for line in lines) and lines[-1].startswith("Next: "), done.stdout
            tried = run(project, lines[-1][len("Next: "):])  # the command demo.py suggests, as printed
            assert len(digits_read(tried.stdout)) == 5
        elif script == "predict.py" and not trained.exists():  # before training: the shipped model, all right
            assert done.stderr.startswith(f"model: {dest / 'pretrained' / 'best_model_simple_pt.pth'} ")
            read = digits_read(done.stdout)
            assert len(read) == 5 and all(name == said for name, said in read), done.stdout
        elif script == "train_pytorch.py":
            assert trained.is_file() and (dest / "results" / "metrics_simple.json").is_file()
        elif script == "predict.py":  # after training: the model just trained (one short epoch: not judged)
            assert done.stderr.startswith(f"model: {trained} "), done.stderr
            assert len(digits_read(done.stdout)) >= 1


def test_predict_section_runs_verbatim_on_a_fresh_copy(project):
    dest, _ = project
    commands = [command for title, command in readme_commands() if title == "predict.py"]
    assert commands
    for command in commands:
        done = run(project, as_run(command))
        if "--json" in command:
            rows = [json.loads(line) for line in done.stdout.splitlines()]
            assert rows and all(row["error"] is None for row in rows)
        else:
            assert digits_read(done.stdout), done.stdout
        if "--save_preprocessed" in command:
            folder = shlex.split(command, comments=True)
            folder = folder[folder.index("--save_preprocessed") + 1]
            assert any((dest / folder).glob("*.png"))
