"""A warm `python` for the commands the tests run: a server that imports torch, scikit-learn, matplotlib and the
other heavy packages once, then forks one child per command.

Why: the docs pages and many end-to-end tests run the commands as a person does, each in a process of its own,
and on the 2-core CPU importing those packages is most of such a process's time: torch 2.6 s, torch's compiler
(which every optimiser loads) 2.4 s, scikit-learn 2.7 s, against 1-3 s of work for most commands. The forked
child is the command in every other respect: a process of its own (pid, exit code, signals), its argv, working
folder, environment and standard streams, and the project's modules imported fresh from the script's folder.
Its `sys.executable` is the `python` shim that started it, as a venv's python is for a command run by it, so the
processes it starts with sys.executable (torchrun's workers, benchmark.py's runs) are warm too. What it does not
repeat is that those packages import in a cold interpreter; demo.py checks that, the tests that are about a
process starting (a fresh process's memory, a bad flag, the ONNX artifacts loaded without our code) start cold,
and MNIST_TEST_COLD=1 makes every command cold (tests/conftest.py).

Written by hand: multiprocessing's forkserver preloads modules too, but serves only the process that started it,
and runs Python functions, not command lines with their own streams.

    python tests/warm_python.py --serve SOCKET           the server; SOCKET.ready appears once it answers
    python -S tests/warm_python.py --client SOCKET EXECUTABLE SHIM ARGS
                                                     what the `python` shim SHIM runs: ARGS as `python ARGS` would

The client sends its three standard file descriptors (SCM_RIGHTS) and {argv, cwd, env}; the server forks a handler,
which forks the command, sends back its pid and then its exit status. The client passes SIGINT, SIGTERM and SIGHUP
on to the command and ends as the command ended; a client killed outright takes its command with it. A command
line the child cannot run as `python` would (any interpreter flag but -u, -c and -m, or no script) is handed to the
real interpreter, cold, as is one started with file descriptors beyond the standard three (a child that is
handed pipes, such as torch's compile workers: the warm child could not see them).
"""
import json
import os
import runpy
import select
import signal
import socket
import sys

PRELOAD = ("numpy", "PIL.Image", "torch", "torch._dynamo", "torch.nn.functional", "sklearn.metrics", "matplotlib",
           "matplotlib.pyplot", "seaborn", "onnx", "onnxruntime", "optuna")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# ---------------------------------------------------------------------------------------------------------------
# The server, its handler and the command (all in this file's process tree)
# ---------------------------------------------------------------------------------------------------------------

def serve(path):
    """Import PRELOAD, then answer connections on the UNIX socket `path`. Returns only in a forked command's child,
    with the request it is to run; the server and the handlers end in os._exit."""
    parent = os.getppid()
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # not installed here: a command that needs it fails as it would cold
            pass
    import torch
    default_threads = torch.get_num_threads()  # the server starts without OMP_NUM_THREADS: a cold start's default
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    server.settimeout(1.0)  # to look up now and then whether the process that started it is still there
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the kernel
    open(path + ".ready", "w").close()
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test session that started it is gone (killed): so is the server
                os._exit(0)
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the handler waits for its command
            request = handle(conn)  # returns in the command's child only
            request["default_threads"] = default_threads
            return request
        conn.close()


def handle(conn):
    """Read one request, fork the command, report its pid and exit status. Returns the request in the child."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = int.from_bytes(data[:8], "big")
    while len(data) < 8 + size:
        more = conn.recv(1 << 16)
        if not more:
            os._exit(1)
        data += more
    request = json.loads(data[8:8 + size])
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        return request
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    while True:  # until the command ends; if the client is killed first (SIGKILL: no signal to pass on), so is it
        readable, _, _ = select.select([conn], [], [], 0.05)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if readable and not conn.recv(1):
            os.kill(pid, signal.SIGKILL)
    try:
        conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    except OSError:  # the client is gone
        pass
    os._exit(0)


def run(request):
    """The command, in this (forked) process, as `python ARGV` would run it (end() then ends the process)."""
    argv = request["argv"]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))  # read at start-up by a cold one
    for sig in FORWARDED:  # as a cold interpreter sets them up from what it inherits (the client's)
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, signal.SIG_IGN if int(sig) in request.get("ignored", ()) else default)
    import torch
    # As torch sets its threads when it starts: MKL_NUM_THREADS if set, else OMP_NUM_THREADS, else its default
    threads = os.environ.get("MKL_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(int(threads) if threads and threads.isdigit() else request["default_threads"])
    sys.executable = request["executable"]
    if argv[:1] == ["-u"]:  # unbuffered streams, as torchrun starts its workers
        argv = argv[1:]
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    if argv[:1] == ["-c"] and len(argv) >= 2:
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        code = compile(argv[1], "<string>", "exec")
        exec(code, {"__name__": "__main__"})
    elif argv[:1] == ["-m"] and len(argv) >= 2:
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def runs_warm(argv):
    """Whether the child can run this command line as `python` would: [-u] and a script, -c CODE or -m MODULE,
    with nothing open but the standard streams."""
    if argv[:1] == ["-u"]:
        argv = argv[1:]
    return (bool(argv) and (argv[0] in ("-c", "-m") and len(argv) >= 2 or not argv[0].startswith("-"))
            and not extra_fds())


def extra_fds():
    """The file descriptors beyond 0-2 this process was started with (the listing's own is closed by then)."""
    try:
        fds = [int(name) for name in os.listdir("/dev/fd") if int(name) > 2]
    except OSError:  # no /dev/fd: nothing to tell
        return []
    open_fds = []
    for fd in fds:
        try:
            os.fstat(fd)
            open_fds.append(fd)
        except OSError:
            pass
    return open_fds


# ---------------------------------------------------------------------------------------------------------------
# The client: the `python` a command line runs
# ---------------------------------------------------------------------------------------------------------------

def client(path, argv, executable, shim):
    if not runs_warm(argv):
        os.execv(executable, [executable, *argv])
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:  # no server (it was stopped): run cold
        os.execv(executable, [executable, *argv])
    # Which of the forwarded signals this process started with ignored (a background job of a script, nohup):
    # the command takes the same, not the server's (the server started as the test session did).
    ignored = [int(sig) for sig in FORWARDED if signal.getsignal(sig) == signal.SIG_IGN]
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "executable": shim,
                          "ignored": ignored}).encode()
    socket.send_fds(conn, [len(payload).to_bytes(8, "big") + payload], [0, 1, 2])
    replies = conn.makefile("rb")
    pid = int(replies.readline())
    for sig in FORWARDED:
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    line = replies.readline()
    code = int(line) if line.strip() else 1
    if code < 0:  # the command died of a signal: so does this process, so a shell sees the same status
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def end(run_command):
    """Run the command and end this process as the interpreter ends a script: threads joined, atexit functions
    run, streams flushed, the exit status of SystemExit or of an uncaught exception. Then os._exit, skipping what a
    forked child must not run: the C++ destructors of libraries whose threads live only in the server (onnxruntime
    and OpenMP join threads that are not there and abort)."""
    import atexit
    import threading
    import traceback
    code = 0
    try:
        run_command()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: B902 - what the interpreter does with any uncaught exception
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # Ctrl-C: a cold interpreter ends by the signal itself
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def main():
    if sys.argv[1:2] == ["--serve"]:
        request = serve(sys.argv[2])
        end(lambda: run(request))
    elif sys.argv[1:2] == ["--client"]:
        client(sys.argv[2], sys.argv[5:], sys.argv[3], sys.argv[4])
    else:
        sys.exit("usage: warm_python.py --serve SOCKET | --client SOCKET EXECUTABLE SHIM ARGS...")


if __name__ == "__main__":
    main()
