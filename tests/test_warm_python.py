"""tests/warm_python.py, the warm `python` the other tests run commands with: a command run through it must behave
as it does under the plain interpreter, or those tests would pass for the wrong reasons."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ctrl_c


def run(python, code, **kwargs):
    return subprocess.run([python, "-c", code, *kwargs.pop("args", [])], capture_output=True, text=True, timeout=60,
                          **kwargs)


def test_argv_folder_environment_and_exit_status_are_the_commands(python, tmp_path):
    code = "import os, sys; print(sys.argv[1:], os.getcwd(), os.environ['PROBE']); sys.exit(3)"
    done = run(python, code, args=["a", "b c"], cwd=tmp_path, env=dict(os.environ, PROBE="seen"))
    assert done.returncode == 3
    assert done.stdout.strip() == f"['a', 'b c'] {tmp_path} seen"


def test_errors_end_as_the_interpreter_ends_them(python, tmp_path):
    failed = run(python, "raise ValueError('boom')")
    assert failed.returncode == 1 and failed.stderr.rstrip().endswith("ValueError: boom")
    said = run(python, "import sys; sys.exit('no model here')")
    assert said.returncode == 1 and said.stderr.strip() == "no model here"
    (tmp_path / "tool.py").write_text("import sys\nprint(sys.path[0], __name__)\nsys.exit(0)\n")
    script = subprocess.run([python, str(tmp_path / "tool.py")], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and script.stdout.split() == [str(tmp_path), "__main__"]


def test_the_project_is_imported_fresh_and_the_threads_follow_the_environment(python):
    code = "import sys, torch; print('data_loader' in sys.modules, torch.get_num_threads())"
    plain = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for settings, threads in (({"OMP_NUM_THREADS": "1"}, "1"), ({"OMP_NUM_THREADS": "2"}, "2"),
                              ({"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "1"}, "1")):  # torch: MKL's first
        done = run(python, code, env={**plain, **settings})
        assert done.stdout.split() == ["False", threads], (settings, done.stderr)


def test_signals_reach_the_command_and_a_killed_client_takes_it_along(python, tmp_path):
    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    for stop, status in ((lambda p: p.send_signal(signal.SIGTERM), -signal.SIGTERM), (lambda p: p.kill(), None)):
        pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen([python, "-c", sleeper])
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        command = int(pid_file.read_text())
        stop(proc)
        proc.wait(timeout=30)
        if status is not None:
            assert proc.returncode == status
        assert gone(command), "the command outlived its client"


def gone(pid, within=5.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(bool(os.environ.get("MNIST_TEST_COLD")), reason="MNIST_TEST_COLD=1: the plain interpreter")
def test_it_is_warm(python):
    """The point of it: torch and scikit-learn are in the command's process before it imports anything."""
    done = run(python, "import sys; print('torch' in sys.modules, 'sklearn.metrics' in sys.modules)")
    assert done.stdout.split() == ["True", "True"] and python != sys.executable


@pytest.mark.skipif(bool(os.environ.get("MNIST_TEST_COLD")), reason="MNIST_TEST_COLD=1: the plain interpreter")
def test_what_a_command_starts_with_sys_executable_is_warm_unless_it_is_handed_pipes(python):
    """torchrun starts its workers as [sys.executable, "-u", script] and benchmark.py its runs as
    [sys.executable, script]: those are warm too. A process handed a pipe beyond the standard streams (torch's
    compile workers) must get it, so it starts cold."""
    probe = "import sys; print(sys.executable, 'torch' in sys.modules, flush=True)"
    starter = ("import os, subprocess, sys\n"
               f"subprocess.run([sys.executable, '-u', '-c', {probe!r}])\n"
               "read, write = os.pipe()\n"
               f"subprocess.run([sys.executable, '-c', {probe!r} + '; import os; os.write({{0}}, b\"x\")'.format(write)],"
               " pass_fds=[write])\n"
               "print(os.read(read, 1))\n")
    done = run(python, starter)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    assert lines[0] == f"{python} True"  # warm, and its own sys.executable is the shim again
    assert lines[1].endswith(" False") and lines[2] == "b'x'"  # cold, and the pipe worked


def test_the_command_ignores_ctrl_c_only_where_its_starter_did(python):
    """A suite started as a background job of a script (or under nohup) starts the shared server with Ctrl-C
    ignored; a command must take its own starter's setting, as a cold interpreter does, not the server's."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"
    for ignored in (False, True):
        done = subprocess.run([*ctrl_c(ignored), python, "-c", probe], capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == str(ignored), done.stderr

