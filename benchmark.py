"""Measure training speed and accuracy on this machine: python benchmark.py [--quick] [--device auto]

Every figure comes from running the real command, train_pytorch.py, in a subprocess, and reading the training
time and test accuracy it reports; accuracy is the mean and spread over several seeds. "Time to 99.0%" is the
training time of the shortest epoch budget whose mean test accuracy reaches 99.0% (the schedule is fitted to the
budget, so this is the time a user would need). Beside it, in the same run, a classic tutorial-style script
(DataLoader, batch 64) trains one epoch, so the speed-up is a ratio measured on the same machine at the same
moment. Results go to <save_dir>/benchmark.json and benchmark.md.
"""
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint import load_checkpoint
from cnn_pytorch import MODELS
from common import PROJECT_DIR, OneLineParser, at_least, atomic_write, cpu_name, memory_format, synchronize

TRAIN_SCRIPT = PROJECT_DIR / "train_pytorch.py"

# Epoch budgets tried per model (shortest first) and the accuracy marks reported for it.
BUDGETS = {"tiny": [1, 2], "simple": [1, 3, 10], "improved": [3, 10]}
MARKS = {"tiny": [0.99], "simple": [0.99, 0.993], "improved": [0.99, 0.995]}
MODEL_FLAGS = {"tiny": ["--preset", "fast"]}  # the recipe each model is meant to be trained with


def parse_args(argv=None):
    p = OneLineParser(prog="benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cuda, cpu (passed on to train_pytorch.py)")
    p.add_argument("--seeds", type=at_least(1), default=3, help="training runs per model and budget")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                   help=f"models to measure (default: all of {list(MODELS)})")
    p.add_argument("--epochs", type=at_least(1), nargs="+", default=None,
                   help="epoch budgets to try for every model (default: a ladder per model)")
    p.add_argument("--quick", action="store_true",
                   help="one seed, one epoch, the simple model only unless --models says more, baseline throughput "
                        "from 300 batches: under two minutes on 2 CPU cores")
    p.add_argument("--no_baseline", action="store_true", help="skip the classic DataLoader script")
    p.add_argument("--extra", default="", help="extra flags for train_pytorch.py, e.g. \"--compile\"")
    p.add_argument("--save_dir", default="results", help="folder for benchmark.json and benchmark.md")
    return p


def machine_info(device):
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def train_once(model, epochs, seed, device, extra, work):
    """One real training run through the training command; returns its report (training seconds, accuracy)."""
    save_dir = Path(work) / f"{model}_e{epochs}_s{seed}"
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--model", model, "--epochs", str(epochs), "--seed", str(seed),
           "--device", str(device), "--save_dir", str(save_dir), "--no_progress", "--no_plots", "--patience", "0",
           *MODEL_FLAGS.get(model, []), *extra]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    process_seconds = time.perf_counter() - start  # the whole command: Python and CUDA start-up included
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed: {result.stderr.strip().splitlines()[-1:]}")
    report = json.loads((save_dir / f"metrics_{model}.json").read_text())
    found = re.search(r"\| train ([\d,]+) val", result.stdout)  # the images per epoch, from the first line
    images = int(found.group(1).replace(",", "")) if found else 0
    return {"seed": seed, "epochs": epochs, "test_accuracy": report["accuracy"],
            "training_seconds": report["training_seconds"],
            **{key: report.get(key) or 0.0 for key in ("data_seconds", "compile_seconds", "warmup_seconds",
                                                        "wall_seconds")},
            "cuda_graphs": bool(report.get("cuda_graphs")), "process_seconds": process_seconds,
            "images_per_second": images * epochs / report["training_seconds"],
            "checkpoint": str(save_dir / f"best_model_{model}_pt.pth")}


@torch.no_grad()
def inference_speed(checkpoint, device, repeats=200):
    """Median latency of one image, and images per second in batches of 1,000 (the model alone, no file I/O)."""
    model, _ = load_checkpoint(checkpoint, device)
    layout = memory_format(device)
    model = model.to(memory_format=layout)
    sync = lambda: synchronize(device)  # noqa: E731
    one = torch.randn(1, 1, 28, 28, device=device).contiguous(memory_format=layout)
    batch = torch.randn(1000, 1, 28, 28, device=device).contiguous(memory_format=layout)
    for _ in range(10):
        model(one)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        model(one)
        sync()
        times.append(time.perf_counter() - t)
    model(batch)
    sync()
    t, n = time.perf_counter(), 5
    for _ in range(n):
        model(batch)
    sync()
    return {"latency_ms_batch1": statistics.median(times) * 1000,
            "images_per_second_batch1000": n * 1000 / (time.perf_counter() - t)}


def classic_baseline(device, max_batches=None):
    """The way most tutorials do it: per-sample PIL transforms in a DataLoader, batch 64, pytorch/examples Net."""
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    import data_loader
    data_loader.check_mnist()
    torch.manual_seed(1)
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize((data_loader.MNIST_MEAN,), (data_loader.MNIST_STD,))])
    train = datasets.MNIST(str(data_loader.DEFAULT_DATA_DIR), train=True, transform=tf)
    test = datasets.MNIST(str(data_loader.DEFAULT_DATA_DIR), train=False, transform=tf)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
                        nn.Linear(128, 10)).to(device)
    opt = torch.optim.Adadelta(net.parameters(), lr=1.0)
    net.train()
    seen, t = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        seen += len(y)
    synchronize(device)
    seconds = time.perf_counter() - t
    result = {"images": seen, "training_seconds": seconds, "images_per_second": seen / seconds,
              "epoch_seconds": seconds * len(train) / seen}
    if max_batches is None:  # accuracy only means something after the whole epoch
        net.eval()
        correct = 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test, batch_size=1000):
                correct += (net(x.to(device)).argmax(1).cpu() == y).sum().item()
        result["test_accuracy"] = correct / len(test)
    return result


def summarise(model, runs, marks):
    """Per budget: mean +- std of accuracy and time; the time to each mark from the shortest passing budget."""
    rows = []
    for epochs in sorted({r["epochs"] for r in runs}):
        rs = [r for r in runs if r["epochs"] == epochs]
        mean = lambda key: statistics.mean(r.get(key, 0.0) for r in rs)  # noqa: E731
        std = lambda key: statistics.stdev(r[key] for r in rs) if len(rs) > 1 else 0.0  # noqa: E731
        # Timed apart from training: loading MNIST onto the device (data); the warm-up (cuDNN autotune,
        # torch.compile, CUDA-graph capture); the whole command, start-up and evaluation included (process).
        rows.append({"epochs": epochs, "seeds": len(rs), "test_accuracy_mean": mean("test_accuracy"),
                     "test_accuracy_std": std("test_accuracy"), "training_seconds_mean": mean("training_seconds"),
                     "seconds_per_epoch": mean("training_seconds") / epochs,
                     **{f"{key}_mean": mean(key) for key in ("data_seconds", "compile_seconds", "warmup_seconds",
                                                              "process_seconds")},
                     "training_seconds_std": std("training_seconds"),
                     "cuda_graphs": all(r.get("cuda_graphs") for r in rs),
                     "images_per_second": mean("images_per_second")})
    time_to = {}
    for mark in marks:
        passing = [row for row in rows if row["test_accuracy_mean"] >= mark]
        time_to[f"{mark * 100:.1f}%"] = passing[0]["training_seconds_mean"] if passing else None
    return {"model": model, "budgets": rows, "time_to": time_to}


def write_markdown(result, path):
    m = result["machine"]
    lines = [f"# Benchmark: {result['date']}", "",
             f"Machine: {'GPU ' + m['gpu'] + ' | ' if 'gpu' in m else ''}CPU {m['cpu']}, {m['cpu_cores']} cores, "
             f"{m['torch_threads']} torch threads | torch {m['torch']} | device {m['device']}", "",
             f"Command: `{result['command']}`", "",
             "| model | epochs | seeds | test accuracy (mean +- std) | training s (mean +- std) | s/epoch | images/s "
             "| CUDA graph | data loading s (apart) | warm-up s (apart; compile included) | whole command s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["models"]:
        for row in s["budgets"]:
            lines.append(f"| {s['model']} | {row['epochs']} | {row['seeds']} | {row['test_accuracy_mean'] * 100:.2f}% "
                         f"+- {row['test_accuracy_std'] * 100:.2f} | {row['training_seconds_mean']:.2f} +- "
                         f"{row['training_seconds_std']:.2f} | {row['seconds_per_epoch']:.2f} | "
                         f"{row['images_per_second']:,.0f} | {'yes' if row['cuda_graphs'] else 'no'} | "
                         f"{row['data_seconds_mean']:.1f} | {row['warmup_seconds_mean']:.1f} | "
                         f"{row['process_seconds_mean']:.1f} |")
    lines += ["", "| model | time to mark (training s) | inference latency, batch 1 | inference, batch 1,000 |",
              "|---|---|---|---|"]
    for s in result["models"]:
        marks = ", ".join(f"{k}: {f'{v:.1f} s' if v is not None else 'not reached'}" for k, v in s["time_to"].items())
        inf = s["inference"]
        lines.append(f"| {s['model']} | {marks} | {inf['latency_ms_batch1']:.2f} ms | "
                     f"{inf['images_per_second_batch1000']:,.0f} images/s |")
    b = result.get("baseline")
    if b:
        whole = "test_accuracy" in b  # a whole epoch, else --quick's 300 batches
        how = "measured" if whole else f"extrapolated from {b['images']} images"
        acc = f"{b['test_accuracy'] * 100:.2f}%" if whole else "not measured (partial epoch)"
        lines += ["", f"Classic DataLoader baseline (pytorch/examples net, batch 64, Adadelta, one epoch): "
                      f"{b['images_per_second']:,.0f} images/s, {b['epoch_seconds']:.1f} s per epoch ({how}), "
                      f"test accuracy {acc}."]
        for s in result["models"]:
            lines.append(f"- {s['model']}: {s['budgets'][0]['images_per_second'] / b['images_per_second']:.1f}x "
                         f"the baseline's training throughput")
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = parse_args(argv)
    args = parser.parse_args(argv)
    device = parser.device(args.device)
    models = args.models or (["simple"] if args.quick else list(MODELS))
    seeds = 1 if args.quick else args.seeds
    out = parser.output_dir(args.save_dir)

    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": shlex.join(["python", "benchmark.py", *argv]),
              "machine": machine_info(device), "models": []}
    with tempfile.TemporaryDirectory() as work:
        if not args.no_baseline:
            print("classic baseline (DataLoader, batch 64) ...", flush=True)
            result["baseline"] = classic_baseline(device, max_batches=300 if args.quick else None)
            print(f"  {result['baseline']['images_per_second']:,.0f} images/s", flush=True)
        for model in models:
            budgets = args.epochs or ([1] if args.quick else BUDGETS.get(model, [1]))
            runs = []
            for epochs in budgets:
                for seed in range(seeds):
                    run = train_once(model, epochs, seed, device, args.extra.split(), work)
                    print(f"{model}: {epochs} epoch(s), seed {seed}: {run['test_accuracy'] * 100:.2f}% in "
                          f"{run['training_seconds']:.1f}s of training", flush=True)
                    runs.append(run)
            summary = summarise(model, runs, MARKS.get(model, [0.99]))
            summary["inference"] = inference_speed(runs[-1]["checkpoint"], device)
            summary["runs"] = [{k: v for k, v in r.items() if k != "checkpoint"} for r in runs]
            result["models"].append(summary)
    with atomic_write(out / "benchmark.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out / "benchmark.md")
    print((out / "benchmark.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
