"""train_pytorch.py under torchrun (DistributedDataParallel, Gloo on the CPU): same command line, same files."""
import os
import socket
import subprocess
import time

import pytest
import torch

import train_pytorch
from checkpoint import load_checkpoint
from conftest import ROOT

SCRIPT = str(ROOT / "train_pytorch.py")
# No augmentation and no dropout (each rank draws its own), and no learning-rate scaling: then two processes
# with --batch_size 64 see exactly the batches of one process with --batch_size 128, and must train the same model.
# Plain SGD, because Adam divides by the gradient's own size and so blows float rounding up to visible differences
# in weights whose gradient is near zero (measured: up to 0.05 after 46 steps, for the same 94.2% accuracy).
FLAGS = ["--model", "simple", "--dropout", "0", "--augment", "none", "--lr_scaling", "none", "--optimizer", "sgd",
         "--learning_rate", "0.02", "--scheduler", "none", "--train_subset", "3000", "--epochs", "1", "--device",
         "cpu", "--no_progress", "--no_plots"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_a_single_process_run(tmp_path, mnist_splits, python):
    # The single-process reference runs in this process (it needs no process of its own); torchrun's are real.
    assert train_pytorch.main([*FLAGS, "--batch_size", "128", "--no_test", "--save_dir", str(tmp_path / "single")]) == 0
    ddp = subprocess.run([python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                          str(free_port()), SCRIPT, *FLAGS, "--batch_size", "64", "--save_dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("test accuracy") == 1, "only rank 0 may report"
    assert "x 2 processes" in ddp.stdout

    model, ckpt = load_checkpoint(tmp_path / "ddp" / "best_model_simple_pt.pth")  # plain model, no "module."
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    single = torch.load(tmp_path / "single" / "best_model_simple_pt.pth", weights_only=True)
    for k, v in single["state_dict"].items():  # the same weights, up to float rounding of the gradient average
        assert torch.allclose(ckpt["state_dict"][k], v, rtol=0, atol=2e-4), k  # measured: 1.2e-7 at most
    assert ckpt["test_accuracy"] > 0.7  # it learned (measured: 76.0% after 23 steps; chance is 10%)

    # The reduced test accuracy is the accuracy of the saved model on the whole test set.
    import data_loader
    images, labels = mnist_splits["test"]
    with torch.no_grad():
        preds = model(data_loader.normalize(images)).argmax(1)
    assert (preds == labels).float().mean().item() == pytest.approx(ckpt["test_accuracy"], abs=1e-4)


@pytest.mark.slow
def test_a_rank_that_dies_makes_the_other_exit_with_a_message_not_hang(tmp_path, python):
    # Through the warm `python`: the kill of rank 1's process is passed on to the command as a SIGKILL.
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([python, SCRIPT, "--train_subset", "2000", "--val_size", "1000", "--epochs", "4",
                                       "--device", "cpu", "--no_progress", "--no_plots", "--save_dir", str(tmp_path),
                                       "--dist_timeout", "60"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for line in procs[0].stdout:
            if line.startswith("epoch   1/4"):
                procs[1].kill()
                killed_at = time.time()
                break
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1
    assert "lost contact with the other training processes" in err
    assert time.time() - killed_at < 90
