"""The commands of the README and of every page in docs/, run verbatim on a fresh copy of the project, in the
order shown: the pages cannot drift from the code.

Every ```bash block of the README's "Quick start" and of every docs/*.md page is read, line by line (a trailing
backslash continues a line); ```text blocks are for reading only and are not run. Each command is run by bash
in one copy of the project made the way a clone would be: the files `git ls-files` names, tracked or
untracked-but-not-ignored, so work not committed yet is tested too, and nothing a run wrote (results/, the
unpacked MNIST) comes along. In one process the Quick start runs first, then the pages in alphabetical order;
under pytest-xdist each worker makes its own copy and takes the tests it is given, so no page may rely on what
the Quick start or another page wrote.

`python` (and `python3`) is the interpreter running this test, from a folder put first on PATH: conftest's
python_bin, whose `python` runs each command in a process of its own forked from a server that has imported torch,
scikit-learn and matplotlib already (tests/warm_python.py; MNIST_TEST_COLD=1 makes it a plain two-line script that
execs sys.executable by the path it was started with). A symlink would not do: a venv's python reached through a
symlink in another folder finds no pyvenv.cfg beside it, and so none of the venv's packages.

Two kinds of line are not run, and are named in SKIPPED: `pip install` (the packages are those of the
environment running this test) and `python -m pytest` (the suite this test is part of). Commands of the
scripts in SHORTENING run as written plus that script's flags, appended here (argparse: the last flag wins);
the pages themselves are never edited to make them shorter.
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

from conftest import python_shim

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
TRAIN_SHORTENING = ["--epochs", "1", "--train_subset", "3000", "--no_progress", "--no_plots"]  # the last flag wins
SHORTENING = {  # flags appended to a command of each script
    "train_pytorch.py": TRAIN_SHORTENING,
    "benchmark.py": ["--epochs", "1", "--seeds", "1", "--extra=--train_subset 3000"],  # test_benchmark runs 2 seeds
    "tune.py": ["--epochs", "1", "--train_subset", "256"],  # not --trials: the grid refuses it
    "export.py": ["--eval_images", "500", "--calibration_images", "200", "--bench_seconds", "0.2"],
    "number_reader.py": ["--steps", "4", "--val_lines", "64", "--eval_every", "2", "--batch_size", "8"],
}
SHELL_OPERATORS = {"&", "&&", ";", "|", "||"}
# The command each page is about: at least one of its runnable lines must run it.
PAGE_COMMAND = {"app.md": "app.py", "benchmark.md": "benchmark.py", "demo.md": "demo.py",
                "evaluate.md": "evaluate.py", "export.md": "export.py", "gpu.md": ".ci/gpu_check",
                "numbers.md": "--number", "predict.md": "predict.py", "torchrun.md": "torch.distributed.run",
                "train.md": "train_pytorch.py", "tune.md": "tune.py", "writers.md": "make_world_shapes.py"}
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
    return [("Quick start", command) for command in bash_commands(section(README.read_text(), "Quick start"))]


def page_commands(page):
    return [command for command in bash_commands(page.read_text()) if not skip_reason(command)]


def skip_reason(command):
    return next((why for start, why in SKIPPED.items() if command.startswith(start)), None)


def as_run(command):
    """The command bash runs: verbatim, or, for a script in SHORTENING run alone (no `&`, `;` or pipe), with that
    script's flags appended (before any comment)."""
    argv = shlex.split(command, comments=True)
    script = next((word for word in argv if word.endswith(".py")), None)
    if script in SHORTENING and not SHELL_OPERATORS & set(argv) and not any(w.endswith(";") for w in argv):
        return shlex.join(argv + SHORTENING[script])
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
def project(tmp_path_factory, python_bin):
    """A fresh copy of the project, and an environment whose `python` is this interpreter."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the copy is made from `git ls-files`")
    dest = fresh_copy(tmp_path_factory.mktemp("fresh_clone"))
    env = dict(os.environ, PATH=f"{python_bin}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONDONTWRITEBYTECODE="1")
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
    quick = [shlex.split(c, comments=True) for title, c in readme_commands()]
    assert quick[0] == ["pip", "install", "-r", "requirements.txt"] and quick[-1][:3] == ["python", "-m", "pytest"]
    assert [argv[1] for argv in quick[1:-1]] == ["demo.py", "predict.py", "train_pytorch.py", "predict.py"]
    assert quick[2] == ["python", "predict.py", "--image_path", "examples/"]


def test_every_page_has_a_runnable_command_that_runs_its_command():
    """A page of only ```text blocks would be tested for nothing; every page is also listed here."""
    assert sorted(PAGE_COMMAND) == [page.name for page in PAGES]
    for page in PAGES:
        commands = page_commands(page)
        assert any(PAGE_COMMAND[page.name] in command for command in commands), (page.name, commands)


def test_the_shortening_flags_are_appended_only_to_a_command_run_alone():
    assert as_run("python export.py  # all formats") == shlex.join(["python", "export.py", *SHORTENING["export.py"]])
    torchrun = "python -m torch.distributed.run --standalone --nproc_per_node=2 train_pytorch.py --model tiny"
    assert as_run(torchrun).endswith(shlex.join(TRAIN_SHORTENING))
    alone = "python app.py --port 8765 & curl -s http://127.0.0.1:8765/health; kill $!"
    assert as_run(alone) == alone


def test_the_commands_python_is_the_interpreter_running_the_tests(project):
    """`python` and `python3` on the commands' PATH are this interpreter, with its packages (sys.prefix)."""
    for name in ("python", "python3"):
        done = run(project, f"{name} -c 'import sys; print(sys.prefix)'")
        assert done.stdout.strip() == sys.prefix


def test_the_shim_keeps_a_venvs_packages(tmp_path):
    """The case a symlink got wrong: a venv's python started from another folder still is that venv."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    executable = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    (tmp_path / "bin").mkdir()
    shim = python_shim(tmp_path / "bin", executable)
    prefix = subprocess.run([str(shim / "python"), "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert Path(prefix).resolve() == venv.resolve()


@pytest.mark.slow
def test_quick_start_runs_verbatim_on_a_fresh_copy(project):
    """In order: demo passes and its next command works; predict reads the examples with the shipped model;
    training writes results/; predict then uses that model."""
    dest, _ = project
    trained = dest / "results" / "best_model_simple_pt.pth"
    for title, command in readme_commands():
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
            assert done.stderr.startswith(f"model: {dest / 'pretrained' / 'best_model_improved_pt.pth'} ")
            read = digits_read(done.stdout)
            assert len(read) == 5 and all(name == said for name, said in read), done.stdout
        elif script == "train_pytorch.py":
            assert trained.is_file() and (dest / "results" / "metrics_simple.json").is_file()
        elif script == "predict.py":  # after training: the model just trained (one short epoch: not judged)
            assert done.stderr.startswith(f"model: {trained} "), done.stderr
            assert len(digits_read(done.stdout)) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_page_runs_verbatim_on_a_fresh_copy(project, page):
    """Each runnable line of the page, in order, on this worker's copy; a few outputs are checked beyond the exit
    code."""
    dest, _ = project
    for command in page_commands(page):
        done = run(project, as_run(command))
        argv = shlex.split(command, comments=True)
        if page.name == "predict.md" and "--json" in argv:
            rows = [json.loads(line) for line in done.stdout.splitlines()]
            assert rows and all(row["error"] is None for row in rows)
        elif page.name == "predict.md":
            assert digits_read(done.stdout), done.stdout
        if "--save_preprocessed" in argv:
            folder = argv[argv.index("--save_preprocessed") + 1]
            assert any((dest / folder).glob("*.png"))
        if "app.py" in argv:  # this command's server answered (not one left on the port by another run)
            assert "serving on" in done.stdout and '"prediction": 5' in done.stdout, done.stdout[-2000:]
        if ".ci/gpu_check" in argv:
            out = next(word.split("=", 1)[1] for word in argv if word.startswith("OUT="))
            assert "**machine**: pass" in (dest / out / "summary.md").read_text()
