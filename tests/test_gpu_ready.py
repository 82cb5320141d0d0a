"""What would fail or mislead on a first GPU run, NVIDIA or Apple, shown on the CPU: the decisions made for a
device, the optimiser flags a resume keeps, a CUDA capture that fails, and torchrun with one process."""
import socket
import subprocess

import pytest
import torch

import distributed
import fast_step
import resume
import train_pytorch
from common import memory_format, random_state, set_random_state, synchronize
from conftest import ROOT

SCRIPT = str(ROOT / "train_pytorch.py")
TINY = ["--model", "tiny", "--train_subset", "1000", "--val_size", "500", "--epochs", "1", "--device", "cpu",
        "--no_progress", "--no_plots", "--no_test"]


# Apple's MPS, decided where the device is decided (no Mac here: these are the decisions themselves).

def test_mps_trains_in_the_standard_layout_and_other_devices_in_channels_last():
    """BatchNorm2d's backward with channels_last input is wrong on MPS before the 2026 fix (the batch-norm
    models diverged there); cuDNN and oneDNN want channels_last."""
    assert memory_format("mps") == torch.contiguous_format
    assert memory_format("cuda") == memory_format("cpu") == torch.channels_last


@pytest.mark.parametrize("optimizer, device, capturable, expected", [
    ("adam", "mps", False, {"fused": True}),  # fused Adam and SGD read the rate on the device: no sync per parameter
    ("sgd", "mps", False, {"fused": True}),
    ("rmsprop", "mps", False, {}),
    ("adam", "cuda", True, {"fused": True, "capturable": True}),
    ("adam", "cuda", False, {"fused": True, "capturable": False}),
    ("sgd", "cuda", True, {"fused": True}),
    ("rmsprop", "cuda", True, {"capturable": True, "foreach": True}),
    ("adam", "cpu", False, {"foreach": False}),
])
def test_each_device_gets_the_optimiser_implementation_that_suits_it(optimizer, device, capturable, expected):
    assert fast_step.optimizer_flags(optimizer, device, capturable) == expected


def test_compile_on_mps_with_an_old_torch_is_refused_in_one_line():
    message = fast_step.compile_problem("mps", "2.7.1")
    assert "torch 2.8 or newer" in message and "2.7.1" in message and "\n" not in message
    assert fast_step.compile_problem("mps", "2.8.0+cpu") is None
    assert fast_step.compile_problem("cuda", "2.6.0") is None


def test_the_random_state_of_an_mps_run_includes_the_mps_generator(monkeypatch):
    """Resume and the warm-up's restore put back every generator the run draws from, MPS's too."""
    calls = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda s: calls.append(("set", s.tolist())))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("sync",)))
    state = random_state("mps")
    assert state["mps"].tolist() == [7] and "mps" not in random_state("cpu")
    set_random_state(state, "mps")
    synchronize("mps")  # the epoch clock waits for the MPS queue as it does for CUDA's
    assert calls == [("set", [7]), ("sync",)]


# Resuming keeps the optimiser this run built.

def test_resume_keeps_this_runs_optimiser_flags_and_places_adams_steps_by_them():
    """A state saved by another implementation (here: capturable, foreach) must not switch this run's off; and
    the other way round a capturable optimiser gets its step counts on the device, as PyTorch requires."""
    model = torch.nn.Linear(3, 2)
    saved_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(1, 3)).sum().backward()
    saved_opt.step()
    saved = saved_opt.state_dict()
    for g in saved["param_groups"]:  # as a CUDA run with a captured step saves it
        g.update(foreach=True, capturable=True)
    mine = torch.optim.Adam(model.parameters(), lr=0.002, foreach=False)
    resume.load_optimizer_state(mine, saved)
    group = mine.param_groups[0]
    assert group["foreach"] is False and group["capturable"] is False and group["lr"] == 0.002
    assert all(s["step"].item() == 1 for s in mine.state.values())

    plain = torch.optim.Adam(model.parameters(), lr=0.01, foreach=False)
    model(torch.ones(1, 3)).sum().backward()
    plain.step()
    lr = torch.tensor(0.003)
    graphed = torch.optim.Adam(model.parameters(), lr=lr, capturable=True)
    resume.load_optimizer_state(graphed, plain.state_dict())
    group = graphed.param_groups[0]
    assert group["capturable"] is True and group["lr"] is lr  # still the tensor the device-side step writes
    assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device
               for p, s in graphed.state.items())


@pytest.mark.slow
def test_a_resumed_run_builds_its_own_optimiser_flags(tmp_path):
    """End to end: a state whose optimiser groups say foreach/capturable, resumed on the CPU, trains with the
    CPU's plain Adam (the groups of the run's own optimiser after set_up)."""
    assert train_pytorch.main([*TINY, "--save_dir", str(tmp_path)]) == 0
    last = tmp_path / "last_tiny_pt.pth"
    state = torch.load(last, weights_only=True)
    for g in state["optimizer"]["param_groups"]:
        g.update(foreach=True, capturable=True)
    torch.save(state, last)
    args = train_pytorch.settings([*TINY, "--epochs", "2", "--resume", "--save_dir", str(tmp_path)])
    run = train_pytorch.set_up(args, distributed.Dist(torch.device("cpu")))
    assert run.state.epoch == 1
    assert all(g["foreach"] is False and g["capturable"] is False for g in run.optimizer.param_groups)


# A capture that CUDA refuses.

class RefusingGraph:
    """torch.cuda.graph as CUDA behaves when it rejects a capture (cudaStreamEndCapture fails)."""

    def __init__(self, graph):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")


def refuse_capture(monkeypatch):
    """On the CPU the fast path is forced and CUDA's refusal is played by a stand-in for torch.cuda.graph."""
    monkeypatch.setattr(fast_step, "wanted", lambda args, device, dist: True)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", RefusingGraph)


def test_a_refused_capture_starts_the_same_command_again_with_the_plain_loop(tmp_path, monkeypatch, capsys):
    """--cuda_graphs auto: nobody reruns by hand. The command starts itself again with --cuda_graphs off, in a
    fresh process (an eager step in the same process is not safe: the CUDA generator can be left in capture
    mode), and says so in one line; the capture comes before epoch 1, so nothing was written."""
    import runpy
    refuse_capture(monkeypatch)
    started = []
    monkeypatch.setattr(fast_step.os, "execv", lambda exe, argv: started.append(argv))
    argv = [str(ROOT / "train_pytorch.py"), *TINY, "--save_dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    runpy.run_path(argv[0], run_name="__main__")  # execv is stood in for: the run returns here
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "operation not permitted when stream is capturing" in err
    assert "starting again with the plain loop (--cuda_graphs off)" in err
    assert started == [[fast_step.sys.executable, *argv, "--cuda_graphs", "off"]]
    assert list(tmp_path.iterdir()) == []


def test_a_refused_capture_with_cuda_graphs_on_stops_with_one_line(tmp_path, monkeypatch, capsys):
    refuse_capture(monkeypatch)
    monkeypatch.setattr(train_pytorch.OneLineParser, "device", lambda self, name: torch.device("cpu"))
    monkeypatch.setattr(fast_step, "check_args", lambda parser, args: setattr(args, "amp", False))
    with pytest.raises(SystemExit) as stopped:
        train_pytorch.main([*TINY, "--cuda_graphs", "on", "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and len(err.splitlines()) == 1 and "--cuda_graphs off" in err
    assert list(tmp_path.iterdir()) == []


# torchrun with one process joins the process group.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_one_process_joins_the_group_and_wraps_the_model_in_ddp(tmp_path, python):
    """With --nproc_per_node=1 the distributed path must still run (Gloo here, NCCL in .ci/gpu_check): a check
    of NCCL with one process is only a check if the process group is really joined."""
    result = subprocess.run([python, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port",
                             str(free_port()), SCRIPT, *TINY, "--dry_run", "--save_dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distributed: 1 process (gloo, DistributedDataParallel)" in result.stdout
    assert "Setup works" in result.stdout


def test_cuda_graphs_on_under_torchrun_is_refused_even_with_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(train_pytorch.OneLineParser, "device", lambda self, name: torch.device("cuda"))
    with pytest.raises(SystemExit) as stopped:
        train_pytorch.main(["--cuda_graphs", "on", "--save_dir", str(tmp_path)])
    assert stopped.value.code == 2
