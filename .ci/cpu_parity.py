"""Is the project's training step as fast on the CPU as the plainest loop one could write? One epoch each,
alternated, on the same data, same model, same optimiser and batch size.

    python .ci/cpu_parity.py [--model simple] [--rounds 2]

The plain loop is what a person would write with the data already in memory as normalised float tensors: a
shuffled index, slice, forward, loss, backward, Adam. The project's epoch is train_pytorch's own plain loop (train_step over
TrainBatches: uint8 data gathered, normalised and augmented per batch, the scheduler, the running sums).
Printed: seconds per epoch of each and their ratio (the goal: at most 1.3).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data_loader  # noqa: E402
import distributed  # noqa: E402
import train_pytorch  # noqa: E402
from cnn_pytorch import build_model  # noqa: E402


def plain_epoch(images, labels, model_name, batch_size):
    torch.manual_seed(0)
    model = build_model(model_name).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(images))
    t = time.perf_counter()
    for i in range(len(images) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t


def project_epoch(model_name, batch_size, augment):
    args = train_pytorch.settings(["--model", model_name, "--device", "cpu", "--batch_size", str(batch_size),
                                   "--save_dir", tempfile.mkdtemp(prefix="parity-"), "--no_progress", "--epochs", "1",
                                   "--augment", "standard" if augment else "none"])
    run = train_pytorch.set_up(args, distributed.Dist(torch.device("cpu")))
    return train_pytorch.train_epoch(run, 1)[2]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="simple")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    opts = p.parse_args()
    train_x, train_y = data_loader.get_splits()["train"]
    images = data_loader.normalize(train_x).contiguous()
    times = {"plain loop (no augmentation)": [], "project, --augment none": [], "project, default augmentation": []}
    for _ in range(opts.rounds):
        times["plain loop (no augmentation)"].append(plain_epoch(images, train_y, opts.model, opts.batch_size))
        times["project, --augment none"].append(project_epoch(opts.model, opts.batch_size, augment=False))
        times["project, default augmentation"].append(project_epoch(opts.model, opts.batch_size, augment=True))
    base = statistics.median(times["plain loop (no augmentation)"])
    print(f"{opts.model}, batch {opts.batch_size}, {torch.get_num_threads()} threads, one epoch of "
          f"{len(images) // opts.batch_size} steps, median of {opts.rounds}:")
    for name, secs in times.items():
        print(f"  {name:32s} {statistics.median(secs):6.1f} s  ({statistics.median(secs) / base:.2f}x the plain "
              f"loop; runs: {', '.join(f'{s:.1f}' for s in secs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
