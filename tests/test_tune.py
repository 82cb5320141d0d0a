"""tune.py: the grid end to end on real training runs, a study interrupted, killed and resumed, two workers on one
journal, two commands sharing a real PostgreSQL, and the search's own logic on a stand-in for train_pytorch.main."""
import csv
import glob
import itertools
import os
import pwd
import re
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
    """n trials done, no configuration run twice, no trial left running."""
    trials = study.get_trials()
    done = [t for t in trials if t.state in DONE]
    assert len(done) == n, [(t.number, t.state, t.user_attrs.get("note")) for t in trials]
    assert len({config(t) for t in done}) == n
    assert all(t.intermediate_values or t.user_attrs.get("note") == "diverged" for t in done)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
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
def test_grid_runs_18_trials_never_touches_the_test_set_and_a_rerun_trains_nothing(tmp_path, monkeypatch, capsys):
    # Every split train_pytorch loads is noted, and so is every batch of images a model scores: the test images
    # must never be among the scored ones.
    test_storages, scored = [], []
    real_get_splits, real_predict, real_main = data_loader.get_splits, data_loader.predict_probs, train_pytorch.main

    def get_splits(*args, **kwargs):
        splits = real_get_splits(*args, **kwargs)
        test_storages.append(splits["test"][0].untyped_storage().data_ptr())
        return splits

    def predict_probs(model, images, *args, **kwargs):
        scored.append(images.untyped_storage().data_ptr())
        return real_predict(model, images, *args, **kwargs)

    monkeypatch.setattr(data_loader, "get_splits", get_splits)
    monkeypatch.setattr(data_loader, "predict_probs", predict_probs)
    # Scoring 5,000 validation images is most of a tiny trial's time; 500 exercise the same path.
    monkeypatch.setattr(train_pytorch, "main", lambda argv, **kw: real_main([*argv, "--val_size", "500"], **kw))

    assert tune.main([*FAST, "--jobs", "1", "--save_dir", str(tmp_path)]) == 0  # in this process, patched

    rows = read_rows(tmp_path)
    assert len(rows) == 18 and {r["state"] for r in rows} == {"complete"}
    assert {(float(r["learning_rate"]), r["optimizer"], int(r["batch_size"])) for r in rows} == set(
        itertools.product(*tune.GRID.values()))
    assert all(r["val_acc"] == r["val_acc_1"] and float(r["seconds"]) > 0 for r in rows)
    best = max(rows, key=lambda r: (float(r["val_acc"]), -int(r["trial"])))
    summary = (tmp_path / "summary.md").read_text()
    assert f"Best: trial {best['trial']}, {float(best['val_acc']):.2%} validation accuracy" in summary
    assert (f"python train_pytorch.py --model tiny --epochs 1 --optimizer {best['optimizer']} --learning_rate "
            f"{float(best['learning_rate']):.4g} --batch_size {best['batch_size']} --scheduler none") in summary
    assert (tmp_path / "optimization_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(test_storages) == 18 and scored
    assert not set(scored) & set(test_storages), "a trial scored the test set"
    assert not list(tmp_path.rglob("metrics_*")) and not list(tmp_path.rglob("*.pth"))
    assert "test accuracy" not in summary

    capsys.readouterr()
    assert tune.main([*FAST, "--jobs", "1", "--save_dir", str(tmp_path)]) == 0  # the same command: nothing to do
    assert len(test_storages) == 18 and "grid-tiny: 18 of 18 trials done" in capsys.readouterr().out
    assert len(journal_study(tmp_path, "grid-tiny").get_trials()) == 18


@pytest.mark.slow
def test_a_study_interrupted_and_killed_resumes_to_the_asked_number_of_trials_none_repeated(tmp_path, python):
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
    assert "the same command resumes the study" in (tmp_path / "run.log").read_text()
    states = [t.state for t in journal_study(tmp_path, "tpe-tiny").get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.RUNNING) == 1

    result = subprocess.run([python, SCRIPT, *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tpe-tiny: 4 of 4 trials done" in result.stdout
    study = journal_study(tmp_path, "tpe-tiny")
    assert_finished_once_each(study, 4)
    assert [t.state for t in study.get_trials()].count(TrialState.FAIL) == 2  # Ctrl-C's trial and the crash's
    rows = read_rows(tmp_path)
    assert [r["state"] for r in rows].count("fail") == 2 and len([r for r in rows if r["state"] != "fail"]) == 4
    assert (tmp_path / "optimization_history.png").exists() and (tmp_path / "param_importances.png").exists()


@pytest.mark.slow
def test_two_workers_share_one_journal_and_ctrl_c_stops_both(tmp_path, python):
    flags = ["--search", "random", "--trials", "4", "--jobs", "2", *FAST, "--save_dir", str(tmp_path)]
    with open(tmp_path / "run.log", "w") as log:
        proc = start(*flags, log=log, python=python)
        deadline = time.monotonic() + 180
        while not (tmp_path / "study.journal").exists() or sum(
                t.state == TrialState.RUNNING and "flags" in t.user_attrs
                for t in journal_study(tmp_path, "random-tiny").get_trials()) < 2:  # both workers in a trial
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # to the command alone: it stops its workers
        assert proc.wait(timeout=60) == 130, (tmp_path / "run.log").read_text()[-2000:]
    trials = journal_study(tmp_path, "random-tiny").get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING], "a stopped worker's trial was left running"
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2

    result = subprocess.run([python, SCRIPT, *flags], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    done = assert_finished_once_each(journal_study(tmp_path, "random-tiny"), 4)
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
        # SQLAlchemy 2.1 reads postgresql:// as psycopg 3; this URL names the driver the fixture checked for.
        yield f"postgresql+psycopg2://tuner:{password}@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_commands_share_one_study_through_postgresql(tmp_path, postgres, python):
    flags = ["--search", "random", "--trials", "4", "--jobs", "1", "--storage", postgres, "--study", "shared", *FAST]
    logs = [open(tmp_path / f"machine{i}.log", "w") for i in (1, 2)]
    try:  # two "machines" that start together on an empty database: the same command, each with its own --save_dir
        procs = [start(*flags, "--save_dir", str(tmp_path / f"machine{i}"), log=log, python=python)
                 for i, log in zip((1, 2), logs)]
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"machine{i}.log").read_text()[-1500:] for i in (1, 2)]
    done = assert_finished_once_each(optuna.load_study(study_name="shared", storage=postgres), 4)
    assert len({t.user_attrs["worker"]["pid"] for t in done}) == 2, "one machine ran every trial"
    password = postgres.split(":")[2].split("@")[0]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and password in p.read_text(errors="ignore")]


# ------------------------------------------------------------------------------------------------------------
# The search's own logic, on a stand-in for train_pytorch.main that keeps its interface and trains nothing
# ------------------------------------------------------------------------------------------------------------

class StandIn:
    """train_pytorch.main(argv, on_epoch): on_epoch after each epoch, then an exit code. `ends` says how the n-th
    call ends: 0, "ctrl-c" (train_pytorch returns 130), "diverged" or "error" (its one-line errors, SystemExit)."""

    def __init__(self, ends=()):
        self.calls, self.ends = [], dict(ends)

    def __call__(self, argv, on_epoch=None):
        self.calls.append(argv)
        end = self.ends.get(len(self.calls), 0)
        flag = dict(zip(argv, argv[1:]))
        if end == "ctrl-c":
            return 130
        if end in ("diverged", "error"):
            print(f"train_pytorch.py: error: {'training diverged at epoch 1' if end == 'diverged' else 'no data'}",
                  file=sys.stderr)
            raise SystemExit(1 if end == "diverged" else 2)
        if "--no_test" not in argv:  # --train_best: what finish() writes
            Path(flag["--save_dir"]).mkdir(parents=True, exist_ok=True)
            Path(flag["--save_dir"], f"metrics_{flag['--model']}.json").write_text(
                '{"accuracy": 0.9876, "val_accuracy": 0.99}')
        for epoch in range(1, int(flag["--epochs"]) + 1):
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "val_acc": 0.9 + float(flag["--learning_rate"]), "val_loss": 0.3})
        return 0


def point(argv):
    flag = dict(zip(argv, argv[1:]))
    return float(flag["--learning_rate"]), flag["--optimizer"], int(flag["--batch_size"])


GRID4 = ["--model", "tiny", "--learning_rates", "0.01", "0.001", "--optimizers", "adam", "sgd", "--batch_sizes", "64",
         "--jobs", "1", "--device", "cpu"]


def test_a_grid_stopped_by_ctrl_c_reruns_only_the_point_it_lost(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_pytorch, "main", first := StandIn({2: "ctrl-c"}))
    assert tune.main([*GRID4, "--save_dir", str(tmp_path)]) == 130
    assert "the same command resumes the study" in capsys.readouterr().err
    monkeypatch.setattr(train_pytorch, "main", second := StandIn())
    assert tune.main([*GRID4, "--save_dir", str(tmp_path)]) == 0
    assert len(first.calls) == 2  # the first point done, the second stopped, the others never started
    assert sorted(map(point, first.calls[:1] + second.calls)) == sorted(
        itertools.product([0.01, 0.001], ["adam", "sgd"], [64])), "a point ran twice, or the stopped one never ran"
    assert [r["state"] for r in read_rows(tmp_path)].count("complete") == 4


@pytest.mark.parametrize("search", ["grid", "random"])
def test_a_trial_another_worker_made_unneeded_is_not_run(tmp_path, monkeypatch, search):
    """Two machines that queue the same grid point, or take the last place in the count, at the same time: the
    trial with the lower number runs, the other is recorded as failed and left out of the reports."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    grid = {"learning_rate": [0.01, 0.001], "optimizer": ["adam", "sgd"], "batch_size": [64]}
    study = optuna.create_study(study_name=f"{search}-tiny", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(tmp_path / "study.journal"))))
    study.set_user_attr("settings", {"search": search, "model": "tiny", "epochs": 1, "train_subset": None, "seed": 0,
                                     "grid": grid if search == "grid" else None})
    for _ in range(2 if search == "grid" else 3):  # the grid point queued twice; three retries for two places
        study.enqueue_trial({"learning_rate": 0.001, "optimizer": "sgd", "batch_size": 64},
                            user_attrs={"grid_point": [0.001, "sgd", 64]} if search == "grid" else None)
    monkeypatch.setattr(train_pytorch, "main", stand_in := StandIn())
    flags = GRID4 if search == "grid" else ["--search", "random", "--trials", "2", "--model", "tiny", "--jobs", "1"]
    assert tune.main([*flags, "--device", "cpu", "--save_dir", str(tmp_path)]) == 0
    runs = 4 if search == "grid" else 2
    assert len(stand_in.calls) == runs and len(read_rows(tmp_path)) == runs
    if search == "grid":
        assert sorted(map(point, stand_in.calls)) == sorted(itertools.product(*grid.values()))
    assert [t.user_attrs.get("note") for t in study.get_trials()].count("surplus") == 1


def test_a_diverged_trial_is_pruned_with_a_note_and_the_search_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(train_pytorch, "main", StandIn({1: "diverged"}))
    assert tune.main([*GRID4, "--save_dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path)
    assert [(r["state"], r["note"]) for r in rows].count(("pruned", "diverged")) == 1
    assert [r["state"] for r in rows].count("complete") == 3


def test_a_failed_trial_stops_the_command_with_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_pytorch, "main", StandIn({2: "error"}))
    assert tune.main([*GRID4, "--save_dir", str(tmp_path)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tune.py: error:")]
    assert len(errors) == 1 and "trial 1 failed (exit code 2): train_pytorch.py: error: no data" in errors[0], errors
    assert [(r["state"], r["note"]) for r in read_rows(tmp_path)] == [("complete", ""), ("fail", "error")]


def test_train_best_trains_the_best_configuration_on_all_images_and_reports_its_test_accuracy(tmp_path, monkeypatch,
                                                                                               capsys):
    monkeypatch.setattr(train_pytorch, "main", stand_in := StandIn())
    assert tune.main([*GRID4, "--train_subset", "500", "--save_dir", str(tmp_path), "--train_best"]) == 0
    best, *_ = stand_in.calls[4:]
    assert point(best) == (0.01, "adam", 64) and "--no_test" not in best and "--train_subset" not in best
    out = capsys.readouterr().out
    command = (f"python train_pytorch.py --model tiny --epochs 1 --optimizer adam --learning_rate 0.01 --batch_size "
               f"64 --scheduler none --seed 0 --save_dir {tmp_path / 'best'}")
    assert f"test accuracy of the best configuration: 98.76%; reproduce it with:\n  {command}" in out
    assert "`--train_best` ran it: **98.76% test accuracy**" in (tmp_path / "summary.md").read_text()


def test_a_second_command_on_the_same_save_dir_is_refused(tmp_path, capsys):
    from filelock import FileLock
    with FileLock(str(tmp_path / "tune.lock")):
        with pytest.raises(SystemExit) as exit_:
            tune.main([*GRID4, "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "another tune.py is running with --save_dir" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------------------
# Flags: --help says only what tune.py takes; a bad flag is one line, exit 2, and nothing run
# ------------------------------------------------------------------------------------------------------------

def test_help_names_only_its_own_flags_and_each_default_once():
    text = tune.parse_args().format_help()
    usage, options = text.split("\noptions:", 1)
    assert set(re.findall(r"--\w+", options)) <= {"--help", *re.findall(r"--\w+", usage)}, "a flag tune.py lacks"
    assert not re.findall(r"--\w+-\w", text), "a dashed spelling"
    for entry in re.split(r"\n  (?=-)", options):
        assert entry.count("default") <= 1, entry


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "argument --epochs: must be at least 1"),
    (["--jobs", "0"], "argument --jobs: must be at least 1"),
    (["--search", "bayes"], "invalid choice"),
    (["--optimizers", "lbfgs"], "invalid choice"),
    (["--model", "resnet"], "invalid choice"),
    (["--learning_rates", "0.001", "-1"], "must be at least 0.0"),
    (["--trials", "5"], "--trials is for --search tpe or random"),
    (["--device", "tpu"], "unknown --device"),
    (["--storage", "results/study.db"], "cannot open the database results/study.db"),
])
def test_bad_flags_give_one_line_and_exit_2_and_run_nothing(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        tune.main([*flags, "--save_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "study.journal").exists()


def test_an_unreachable_storage_is_one_line_and_exit_2(tmp_path, capsys):
    port = free_port()  # nothing listens there; without psycopg 3, postgresql:// names a driver that is missing
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--storage", f"postgresql://tuner:secret@127.0.0.1:{port}/optuna", "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"cannot open the database postgresql://tuner:***@127.0.0.1:{port}/optuna: " in err
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
