"""tune.py end to end, with real training runs on a small subset: the grid, a study killed and resumed, two
workers on one storage, a real PostgreSQL shared by two commands, and the one-line errors."""
import csv
import glob
import itertools
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="tune.py's own package: pip install 'optuna>=4.0'")
from optuna.trial import TrialState  # noqa: E402

import data_loader
import train_pytorch
import tune
from conftest import DEVICE, ROOT, ctrl_c

SCRIPT = str(ROOT / "tune.py")
# The tiny CNN on 256 images: a trial is a second or two on the CPU, and still a real train_pytorch run.
FAST = ["--model", "tiny", "--train_subset", "256", "--device", DEVICE]
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Trials of a few tiny batches train fastest on one thread, and a busy machine (CI runners, parallel test
    runs) does not slow them down several times over with two threads fighting for the cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the commands the tests start
    yield
    torch.set_num_threads(threads)


def read_rows(save_dir):
    with open(save_dir / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def journal_study(save_dir, name):
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    storage = JournalStorage(JournalFileBackend(str(save_dir / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def config(trial):
    return tuple(sorted(trial.params.items()))


def assert_finished_once_each(study, n):
    """n trials done, no configuration run twice, no trial left running, every failure a clean one."""
    trials = study.get_trials()
    done = [t for t in trials if t.state in DONE]
    assert len(done) == n, [(t.number, t.state, t.user_attrs.get("note")) for t in trials]
    assert len({config(t) for t in done}) == n
    assert all(t.user_attrs.get("history") or t.user_attrs.get("note") == "diverged" for t in done)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert {tune.note(t) for t in trials if t.state == TrialState.FAIL} <= {"surplus", "interrupted", "worker died"}
    return done


def start(*flags, log, python):
    """The command in the background, run by `python` (the fixture). Through the warm `python`, a kill of the process the test holds is passed on
    as a SIGKILL of the command within 50 ms (tests/warm_python.py): the command still dies without a word."""
    return subprocess.Popen([*ctrl_c(ignored=False), python, SCRIPT, *flags], stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # Ctrl-C at its default, as in a terminal


def wait_for_running(save_dir, name, n, proc, timeout=180):
    """Until the storage holds n finished trials and the command is in the middle of the next one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the command ended before it could be interrupted"
        if (save_dir / "study.journal").exists():
            try:
                trials = journal_study(save_dir, name).get_trials()
            except KeyError:  # the study is not created yet
                trials = []
            if (sum(t.state in DONE for t in trials) >= n
                    and any(t.state == TrialState.RUNNING and "flags" in t.user_attrs for t in trials)):
                return
        time.sleep(0.05)
    raise AssertionError(f"{n} trials were not done within {timeout} s")


@pytest.mark.slow
def test_grid_runs_18_trials_writes_the_heatmap_and_never_touches_the_test_set(tmp_path, monkeypatch):
    # Every split train_pytorch loads is noted, and so is every batch of images a model scores: the test images
    # must never be among the scored ones.
    test_storages, scored = [], []
    real_get_splits, real_predict, real_main = data_loader.get_splits, train_pytorch.predict_probs, train_pytorch.main

    def get_splits(*args, **kwargs):
        splits = real_get_splits(*args, **kwargs)
        test_storages.append(splits["test"][0].untyped_storage().data_ptr())
        return splits

    def predict_probs(model, images, *args, **kwargs):
        scored.append(images.untyped_storage().data_ptr())
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(data_loader, "get_splits", get_splits)
    monkeypatch.setattr(train_pytorch, "predict_probs", predict_probs)
    # Scoring 5,000 validation images is most of a tiny trial's time; 500 exercise the same path.
    monkeypatch.setattr(train_pytorch, "main", lambda argv, **kw: real_main([*argv, "--val_size", "500"], **kw))

    assert tune.main([*FAST, "--jobs", "1", "--save_dir", str(tmp_path)]) == 0  # in this process, patched

    rows = read_rows(tmp_path)
    assert len(rows) == 18 and {r["state"] for r in rows} == {"complete"}
    assert {(float(r["learning_rate"]), r["optimizer"], int(r["batch_size"])) for r in rows} == set(
        itertools.product(*tune.GRID.values()))
    assert all(r["val_acc"] == r["val_acc_1"] and float(r["seconds"]) > 0 for r in rows)
    best = min(rows, key=lambda r: (-float(r["val_acc"]), float(r["val_loss"])))
    summary = (tmp_path / "summary.md").read_text()
    assert f"Trial {best['trial']}: {float(best['val_acc']) * 100:.2f}% validation accuracy" in summary
    assert (f"python train_pytorch.py --model tiny --epochs 1 --optimizer {best['optimizer']} --learning_rate "
            f"{float(best['learning_rate']):.4g} --batch_size {best['batch_size']} --scheduler none") in summary
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(test_storages) == 18 and scored
    assert not set(scored) & set(test_storages), "a trial scored the test set"
    assert not list(tmp_path.rglob("metrics_*")) and not list(tmp_path.rglob("*.pth"))
    assert "test accuracy" not in summary


@pytest.mark.slow
def test_a_killed_study_resumes_to_the_asked_number_of_trials_none_repeated(tmp_path, python):
    flags = ["--search", "tpe", "--trials", "4", "--jobs", "1", *FAST, "--save_dir", str(tmp_path)]
    with open(tmp_path / "run.log", "w") as log:
        # Ctrl-C: the running trial is recorded as failed and the command says how to resume.
        proc = start(*flags, log=log, python=python)
        wait_for_running(tmp_path, "tpe-tiny", 1, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        # A crash: killed outright, its running trial left behind as RUNNING in the storage.
        proc = start(*flags, log=log, python=python)
        wait_for_running(tmp_path, "tpe-tiny", 2, proc)
        proc.kill()
        proc.wait(timeout=60)
    output = (tmp_path / "run.log").read_text()
    assert "the same command resumes the study" in output
    notes = [tune.note(t) for t in journal_study(tmp_path, "tpe-tiny").get_trials()]
    assert notes.count("interrupted") == 1 and notes.count("") >= 2

    result = subprocess.run([python, SCRIPT, *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tpe-tiny: 4 of 4 trials done" in result.stdout
    study = journal_study(tmp_path, "tpe-tiny")
    assert_finished_once_each(study, 4)
    assert [tune.note(t) for t in study.get_trials()].count("worker died") == 1  # the crash's trial
    assert [r["note"] for r in read_rows(tmp_path)].count("worker died") == 1  # and trials.csv says so
    assert len([r for r in read_rows(tmp_path) if r["state"] in ("complete", "pruned")]) == 4
    assert (tmp_path / "optimization_history.png").exists() and (tmp_path / "param_importances.png").exists()


@pytest.mark.slow
def test_two_workers_on_one_storage_finish_one_study_without_losing_a_trial(tmp_path, python):
    result = subprocess.run([python, SCRIPT, "--search", "random", "--trials", "4", "--jobs", "2", *FAST,
                             "--save_dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    done = assert_finished_once_each(journal_study(tmp_path, "random-tiny"), 4)
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2, "one worker ran every trial"
    assert sorted(int(r["trial"]) for r in read_rows(tmp_path) if r["state"] == "complete") == sorted(
        t.number for t in done if t.state == TrialState.COMPLETE)


# ------------------------------------------------------------------------------------------------------------
# A real PostgreSQL: a throwaway cluster in a temporary folder, on 127.0.0.1 only, stopped at the end
# ------------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdbs:
        pytest.skip("Debian's PostgreSQL server is not installed: apt-get install postgresql (.ci/run does)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver is missing: pip install psycopg2-binary")
    bin_dir = Path(initdbs[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="tune-postgres-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to nobody
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    password = secrets.token_hex(12)
    (root / "password").write_text(password)
    if as_user:
        os.chown(root / "password", nobody.pw_uid, nobody.pw_gid)
    data, port = root / "data", free_port()

    def pg(tool, *args):
        subprocess.run([*as_user, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    try:
        pg("initdb", "-D", str(data), "-U", "tuner", "--pwfile", str(root / "password"), "--auth",
           "scram-sha-256", "--no-locale", "-E", "UTF8", "--no-sync")
        pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off", "start")
        yield f"postgresql://tuner:{password}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_commands_share_one_study_through_postgresql(tmp_path, postgres, python):
    flags = ["--search", "random", "--trials", "4", "--jobs", "1", "--storage", postgres, "--study", "shared", *FAST]
    logs = [open(tmp_path / f"machine{i}.log", "w") for i in (1, 2)]
    try:  # two "machines": the same command, each with its own --save_dir
        procs = [start(*flags, "--save_dir", str(tmp_path / f"machine{i}"), log=log, python=python)
                 for i, log in zip((1, 2), logs)]
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"machine{i}.log").read_text()[-1500:] for i in (1, 2)]
    study = optuna.load_study(study_name="shared", storage=tune.open_storage(postgres, tmp_path)[0])
    done = assert_finished_once_each(study, 4)
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2, "one machine ran every trial"
    assert password_not_in(postgres, tmp_path)


def password_not_in(url, folder):
    password = url.split(":")[2].split("@")[0]
    return not any(password in p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file()
                   and p.suffix in (".md", ".csv", ".log"))


# ------------------------------------------------------------------------------------------------------------
# Bad flags: one line, exit 2, nothing run
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--search", "bayes"], "invalid choice"),
    (["--optimizers", "lbfgs"], "invalid choice"),
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--learning_rates", "0.001", "0"], "--learning_rates must all be positive"),
    (["--batch_sizes", "64", "64"], "lists a value twice"),
    (["--train_subset", "100", "--batch_sizes", "128"], "--batch_sizes must be between 1 and the 100"),
    (["--trials", "5"], "--trials is for --search tpe or random"),
    (["--search", "tpe", "--optimizers", "adam"], "--optimizers set the grid"),
    (["--device", "tpu"], "unknown --device"),
    (["--storage", "results/study.db"], "is not a database URL"),
])
def test_bad_flags_give_one_line_and_exit_2_and_run_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        tune.main([*flags, "--save_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "study.journal").exists()


def test_an_unreachable_storage_is_one_line_and_exit_2(tmp_path, capsys):
    port = free_port()  # nothing listens there
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--storage", f"postgresql://tuner:secret@127.0.0.1:{port}/optuna", "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot open the --storage database postgresql://tuner:***@127.0.0.1" in err or "needs its Python driver" in err
    assert "secret" not in err  # the password is never printed


def test_a_study_is_only_resumed_with_its_own_settings(tmp_path, capsys):
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.journal")))
    optuna.create_study(study_name="grid-tiny", storage=storage, direction="maximize").set_user_attr(
        "settings", {"search": "grid", "model": "tiny", "epochs": 3})
    with pytest.raises(SystemExit) as exit_:
        tune.main([*FAST, "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "made with other settings: epochs 3 (now 1)" in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_without_optuna_it_is_one_line_and_exit_2(tmp_path):
    """optuna is tune.py's own package: missing, the command names it and its install, and nothing else breaks."""
    hide = ("import runpy, sys; sys.modules['optuna'] = None; sys.argv = ['tune.py', *sys.argv[1:]]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", hide, "--save_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"tune.py: error: {tune.NO_OPTUNA}", done.stderr
    assert tune.NO_OPTUNA == 'optuna is not installed: pip install "optuna>=4.0" (tune.py needs it)'
    assert not list(tmp_path.iterdir())
