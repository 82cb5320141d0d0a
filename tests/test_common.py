"""common.atomic_write and writable_dir: a failed or killed writer never costs the old file, and folder errors are
one line.

atomic_write writes to a temporary file beside the target and renames it over the target only once the block has
finished and the data is fsynced. Every error, KeyboardInterrupt included, removes the temporary file; a process
killed outright (SIGKILL, power loss) runs no cleanup, so its temporary file stays behind: hidden (a leading dot),
named after the target and the writer's process id, and never mistaken for the target, which keeps its old bytes.
"""
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import common
from common import OneLineParser, atomic_write, writable_dir

ROOT = Path(__file__).resolve().parent.parent
OLD = b"the old, complete contents\n"


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "report.json"
    path.write_bytes(OLD)
    return path


def leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


def test_a_finished_block_replaces_the_file_and_leaves_nothing_else(target):
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == target.suffix and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and leftovers(target.parent, target.name) == []


def test_the_new_file_gets_the_usual_permissions_not_0600(tmp_path):
    plain, atomic = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    with atomic_write(atomic) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


class Boom(Exception):
    pass


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("written", ["nothing", "half"])
def test_an_error_in_the_block_keeps_the_old_file_and_removes_the_temporary(target, error, written):
    with pytest.raises(error):
        with atomic_write(target) as tmp:
            if written == "half":
                tmp.write_bytes(b"half of the new")
            raise error()
    assert target.read_bytes() == OLD and leftovers(target.parent, target.name) == []


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failing_fsync_or_rename_keeps_the_old_file_and_removes_the_temporary(target, failing, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.os, failing, fail)
    with pytest.raises(OSError, match="No space left"):
        with atomic_write(target) as tmp:
            tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert target.read_bytes() == OLD and leftovers(target.parent, target.name) == []


def test_a_first_write_that_fails_leaves_no_file_at_all(tmp_path):
    with pytest.raises(Boom):
        with atomic_write(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"\x89PNG")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from common import atomic_write
    with atomic_write(sys.argv[2]) as tmp, open(tmp, "wb") as f:
        f.write(b"n" * (1 << 20))
        f.flush()
        print(tmp, flush=True)       # a megabyte is out: the parent may kill us now
        while True:                  # ... a large file, still being written
            f.write(b"n" * (1 << 16))
            time.sleep(0.005)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX")
def test_a_writer_killed_midway_leaves_the_old_file_intact(target):
    """SIGKILL mid-write: no cleanup runs, yet the target keeps its old bytes; only the hidden temporary remains."""
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(ROOT), str(target)], stdout=subprocess.PIPE,
                              text=True)
    try:
        tmp = Path(writer.stdout.readline().strip())
        time.sleep(0.2)  # mid-write
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    assert writer.returncode == -signal.SIGKILL
    assert target.read_bytes() == OLD
    assert leftovers(target.parent, target.name) == [tmp.name]  # the one stray temporary, and nothing else
    assert tmp.name.startswith(f".{target.stem}.{writer.pid}-") and tmp.name.endswith(f".tmp{target.suffix}")
    assert tmp.stat().st_size >= 1 << 20
    with atomic_write(target) as again:  # the next writer is not disturbed by it
        again.write_bytes(b"new")
    assert target.read_bytes() == b"new"


# ---- writable_dir ------------------------------------------------------------------------------------------------

def test_writable_dir_creates_the_folder_and_leaves_nothing_in_it(tmp_path):
    folder = writable_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_writable_dir_refuses_in_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as err:
        writable_dir(blocker / "results", "--output_dir")
    message = str(err.value)
    assert message.startswith(f"cannot write to --output_dir {blocker / 'results'} (") and "\n" not in message
    assert message.endswith("pick a folder you can write to")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to read-only folders")
def test_writable_dir_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot write to --save_dir .*Permission denied"):
            writable_dir(folder)
    finally:
        folder.chmod(0o700)


def test_the_parser_turns_it_into_one_line_and_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    parser = OneLineParser(prog="tool.py")
    with pytest.raises(SystemExit) as exit_:
        parser.output_dir(blocker / "out")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith("tool.py: error: cannot write to --save_dir ") and err.endswith("(see --help)\n")


def test_relative_output_folders_are_taken_from_the_project_folder():
    assert common.project_path("results") == ROOT / "results"
    assert common.project_path(ROOT / "elsewhere") == ROOT / "elsewhere"
