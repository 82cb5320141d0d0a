"""Where one training step's time goes: the CPU time to issue it against the GPU's kernel time, eager and replayed
as a CUDA graph, in the steady state (after the warm-up). Run by .ci/gpu_check; on the CPU it reports the eager
step's time only.

    python .ci/profile_step.py --model tiny --device cuda [--steps 50] [--batch_size 128]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import distributed  # noqa: E402
import train_pytorch  # noqa: E402


def kernel_events(prof):
    """The GPU kernels (and memcpy/memset) the profiler saw, however this torch version names their device."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in prof.events() if getattr(e, "device_type", None) == cuda]


def measure(take, steps, device):
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for _ in range(10):  # steady state
        take()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        take()
    issued = time.perf_counter() - t  # the CPU is free again after this: the rest is the GPU catching up
    sync()
    wall = time.perf_counter() - t
    result = {"cpu_ms": issued / steps * 1e3, "wall_ms": wall / steps * 1e3}
    if cuda:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                take()
            sync()
        kernels = kernel_events(prof)
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps
        result.update(gpu_ms=busy, kernels=len(kernels) / steps, gpu_busy=busy / result["wall_ms"])
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=128)
    opts = p.parse_args()
    args = train_pytorch.settings(["--model", opts.model, "--device", opts.device, "--batch_size",
                                   str(opts.batch_size), "--save_dir", tempfile.mkdtemp(prefix="profile-"),
                                   "--no_progress"])
    run = train_pytorch.set_up(args, distributed.Dist(torch.device(args.device)))
    run.model.train()
    run.batches.new_epoch()
    if run.fast is not None:  # one CUDA GPU: fast_step's step, eagerly and replayed from its graph
        run.fast.start_epoch(1)
        modes = [("eager", run.fast)] + ([("cuda graph", run.fast.graph.replay)] if run.fast.graph is not None else [])
    else:  # the plain loop's step on its first batch (gathered and augmented each time, as in training)
        modes = [("eager", lambda: train_pytorch.train_step(run.step_model, run.optimizer, *run.batches.batch(0),
                                                            run.ctx, args.label_smoothing))]
    for name, take in modes:
        r = measure(take, opts.steps, run.device)
        line = f"profile {opts.model} batch {run.batches.batch_size} {name}: CPU {r['cpu_ms']:.3f} ms/step to issue, " \
               f"wall {r['wall_ms']:.3f} ms/step"
        if "gpu_ms" in r:
            line += (f", GPU kernels {r['gpu_ms']:.3f} ms/step ({r['kernels']:.0f} kernels), GPU busy "
                     f"{r['gpu_busy'] * 100:.0f}%, epoch of {len(run.batches)} steps ~{r['wall_ms'] * len(run.batches) / 1e3:.2f} s")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
