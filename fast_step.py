"""What makes the training step fast on a GPU: the whole step captured once as a CUDA graph and replayed.

Read train_pytorch.py first: its train_step() is the step, and its epoch loop the plain way to run it (CPU, MPS,
torchrun). On one CUDA GPU the plain loop leaves the GPU waiting on Python between small kernels, so
train_pytorch calls enable(), and FastStep runs the same train_step with everything around it on the device:
the batch picked by a step counter on the device, the learning rate copied from LearningRates' table into a
0-dim tensor, the running sums kept there, and with --ema the average updated there too (DeviceEMA). Nothing in
a step needs the host, so it is captured as a CUDA graph and every later step is one replay. warm_up() takes a
few real steps before the clock starts and puts everything back. tests/test_train.py holds FastStep to the plain
loop, and the graph to the eager step. This module also owns a GPU run's flags and the decisions made once for
the device (precision()); if CUDA refuses the capture, the command starts again with the plain loop.
"""
import argparse
import itertools
import os
import sys
import time
import warnings
from contextlib import nullcontext

import torch
from packaging.version import Version

from checkpoint import unwrap
from common import fail, random_state, set_random_state, synchronize

WARM_UP_STEPS = 3  # cuDNN autotune, lazy initialisation, compilation: all done before the clock starts


def add_args(parser):
    group = parser.add_argument_group("speed on a GPU (fast_step.py)")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction,
                       help="bf16 autocast (default: on with CUDA, off elsewhere)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model, before the clock starts (its time is reported apart)")
    group.add_argument("--cuda_graphs", default="auto", choices=["auto", "on", "off"],
                       help="capture the whole training step as one CUDA graph and replay it, so the GPU never "
                            "waits on Python; auto: on for single-process CUDA training, and if CUDA refuses the "
                            "capture the run starts again with the plain loop; on: a refusal stops the run")
    group.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms: two GPU runs with one seed give the same weights; costs "
                            "speed on a GPU (no cuDNN autotune), nothing on the CPU")


def check_args(parser, args):
    device = torch.device(args.device)
    if args.cuda_graphs == "on" and device.type != "cuda":
        parser.error("--cuda_graphs on needs a CUDA device: use --device cuda, or --cuda_graphs auto")
    if args.cuda_graphs == "on" and "RANK" in os.environ:
        parser.error("--cuda_graphs on is for single-process training; under torchrun use auto or off")
    if args.compile and compile_problem(device.type, torch.__version__):
        parser.error(compile_problem(device.type, torch.__version__))
    if args.amp is None:
        args.amp = device.type == "cuda"


def compile_problem(device_type, torch_version):
    """Why --compile cannot work here, or None: torch.compile has no MPS backend before torch 2.8."""
    if device_type == "mps" and Version(torch_version.split("+")[0]) < Version("2.8"):
        return f"--compile on MPS needs torch 2.8 or newer (this is {torch_version}): upgrade torch or drop --compile"
    return None


def precision(args, device):
    """Decided once, before anything is built: determinism, cuDNN autotuning, and the autocast context. The
    autocast cache is off: it cannot live inside a captured graph, and each weight is cast once anyway."""
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable sums
    torch.use_deterministic_algorithms(args.deterministic)  # both ways: main() may run twice in one process
    torch.backends.cudnn.deterministic = args.deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not args.deterministic
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False) if args.amp else nullcontext()


def wanted(args, device, dist):
    """Whether this run takes the fast path: one CUDA GPU, one process, graphs not switched off."""
    return device.type == "cuda" and not dist.enabled and args.cuda_graphs != "off" and not args.dry_run


class CaptureFailed(RuntimeError):
    """CUDA refused to capture the step (see rerun_without_graph)."""


class LearningRates:
    """The learning rate of every step of the run, as one float32 tensor on the device that the step indexes.

    PyTorch's own schedulers compute the values (train_pytorch.make_scheduler, as in the plain loop), driving a
    stand-in optimiser that holds one dummy parameter: they write Python floats into their optimiser, which a
    CUDA graph could not see.
    """

    def __init__(self, make_scheduler, base_lr, total_steps, device):
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        scheduler, values = make_scheduler(stand_in), []
        with warnings.catch_warnings():  # the stand-in never steps: PyTorch's "step order" warning is moot here
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
            for i in range(total_steps):
                values.append(stand_in.param_groups[0]["lr"])
                if i + 1 < total_steps:  # OneCycleLR refuses to step past its last step
                    scheduler.step()
        self.table = torch.tensor(values, dtype=torch.float32, device=device)
        self.steps_per_epoch = None  # set by FastStep

    def used_in(self, epoch):
        """The rate of the last step of epoch `epoch` (for the history)."""
        return self.table[epoch * self.steps_per_epoch - 1].item()


class DeviceEMA:
    """ema.py's AveragedModel update, with nothing read back to the host, into that AveragedModel's own tensors
    (so checkpoints and --resume are the same whichever path trained). AveragedModel.update_parameters asks the
    host `if n_averaged == 0` (the first update copies), which a captured graph would replay as it saw it; here
    the branch is a number on the device: one lerp over the weights and buffers, by 1 on the first update (lerp
    returns the end point exactly at 1) and by 1 - decay after. Integer buffers get AveragedModel's formula."""

    def __init__(self, averaged, model, decay):
        device = next(model.parameters()).device
        averaged.n_averaged = averaged.n_averaged.to(device)  # still the registered buffer: saved and loaded
        self.n_averaged, self.decay = averaged.n_averaged, decay
        pairs = [(a.detach(), m.detach()) for a, m in
                 zip(itertools.chain(averaged.module.parameters(), averaged.module.buffers()),
                     itertools.chain(model.parameters(), model.buffers()), strict=True)]
        self.floats = [a for a, _ in pairs if a.is_floating_point()], [m for a, m in pairs if a.is_floating_point()]
        self.integers = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self):
        first = self.n_averaged == 0
        weight = torch.where(first, 1.0, 1.0 - self.decay)  # a 0-dim float32 tensor on the device
        averages, current = self.floats
        # A list of tensor weights: a lone tensor would be taken for a Python number, read back with .item().
        torch._foreach_lerp_(averages, current, [weight] * len(averages))
        for a, m in self.integers:
            a.copy_(torch.where(first, m, a * self.decay + m * (1 - self.decay)))
        self.n_averaged += 1


class FastStep:
    """train_step with its batch, learning rate and running sums on the device: capturable as one CUDA graph.

    In a captured step, zero_grad(set_to_none=True) makes backward write fresh gradients into memory the graph
    owns, which is what every replay then reuses.
    """

    def __init__(self, train_step, model, optimizer, batches, lrs, ctx, label_smoothing, ema=None, ema_decay=0.0):
        device = batches.images.device
        self.train_step, self.model, self.optimizer, self.batches = train_step, model, optimizer, batches
        self.lrs, self.ctx, self.label_smoothing = lrs, ctx, label_smoothing
        lrs.steps_per_epoch = len(batches)
        self.lr = optimizer.param_groups[0]["lr"]  # the 0-dim tensor every parameter group shares
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # steps taken since the run began
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        # ema: train_pytorch's AveragedModel (made with get_ema_multi_avg_fn(ema_decay)) or None, updated in place
        self.ema = DeviceEMA(ema, unwrap(model), ema_decay) if ema is not None else None

    def __call__(self):
        x, y = self.batches.batch(self.counter % len(self.batches))
        self.lr.copy_(self.lrs.table.index_select(0, self.counter.view(1)).view(()))
        loss, logits = self.train_step(self.model, self.optimizer, x, y, self.ctx, self.label_smoothing)
        if self.ema is not None:
            self.ema.update()
        self.loss_sum += loss.float() * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.counter += 1

    def start_epoch(self, epoch):
        """Before epoch `epoch` (1-based): the counter points at its first step, the sums start from zero."""
        self.counter.fill_((epoch - 1) * len(self.batches))
        self.loss_sum.zero_()
        self.correct.zero_()

    def run_epoch(self, epoch, steps):
        """The steps of epoch `epoch` (a number, or an iterable such as a progress bar over a range), replayed
        from the graph when there is one; returns the device sums."""
        self.start_epoch(epoch)
        take = self.graph.replay if self.graph is not None else self
        for _ in range(steps) if isinstance(steps, int) else steps:
            take()
        return self.loss_sum, self.correct


def optimizer_flags(optimizer, device_type, capturable):
    """Which of PyTorch's implementations an optimiser uses on a device, decided in one place.

    CUDA: fused kernels (one launch for all parameters); capturable when the step will be captured (PyTorch
    refuses to capture Adam without it, and warns when a capturable optimiser runs eagerly). MPS: fused Adam
    and SGD read the learning rate on the device; the single-tensor path would make a GPU sync per parameter.
    CPU: the plain per-parameter loop, which is the fastest there for these small models.
    """
    if device_type == "cuda":
        if optimizer == "rmsprop":  # no fused RMSprop in PyTorch
            return {"capturable": capturable, "foreach": True}
        return {"fused": True, **({"capturable": capturable} if optimizer == "adam" else {})}
    if device_type == "mps":
        return {"fused": True} if optimizer in ("adam", "sgd") else {}
    return {"foreach": False} if optimizer == "adam" else {}


def _snapshot(model, optimizer, counter, ema=None):
    """Copies of everything a few training steps change, so that warm_up can put all of it back."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "ema": {k: v.clone() for k, v in ema.state_dict().items()} if ema is not None else None,
            "optimizer": {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                          for p, s in optimizer.state.items()},
            "counter": counter.clone() if counter is not None else None,
            "rng": random_state(next(model.parameters()).device)}


def _restore(saved, model, optimizer, counter, ema=None):
    """In place, never by replacing tensors: a captured graph keeps pointing at the same memory."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(saved["model"][k])
        if ema is not None:  # the average's weights, buffers and n_averaged (the warm-up's updates undone)
            for k, v in ema.state_dict().items():
                v.copy_(saved["ema"][k])
        for p, state in optimizer.state.items():
            before = saved["optimizer"].get(p)
            for k, v in state.items():
                if torch.is_tensor(v):  # a state made by the warm-up itself starts from zero, as a fresh one does
                    v.copy_(before[k]) if before is not None else v.zero_()
        if counter is not None:
            counter.copy_(saved["counter"])
    set_random_state(saved["rng"], next(model.parameters()).device)


def capture(step):
    """One call of `step` captured as a CUDA graph (CUDA only); CaptureFailed, with CUDA's reason, if refused."""
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    except Exception as err:
        raise CaptureFailed(f"CUDA would not capture the training step as a graph "
                            f"({' '.join(str(err).split())[:160]})") from None
    return graph


def warm_up(step, model, optimizer, counter=None, capture_graph=False, steps=WARM_UP_STEPS, ema=None):
    """A few real steps before the clock starts, then everything put back; returns (CUDA graph or None, seconds).

    step: a callable that takes one training step (a FastStep, or the plain loop's step on its first batch).
    counter: the FastStep's device counter, and ema: the AveragedModel it updates (if any), put back too. With
    capture_graph=True (CUDA only), one step is then captured as a CUDA graph; a capture that CUDA refuses raises
    CaptureFailed.
    """
    device = next(model.parameters()).device
    saved = _snapshot(model, optimizer, counter, ema)
    t = time.perf_counter()
    cuda = device.type == "cuda"
    if cuda:  # warm-up off the default stream, as graph capture wants it
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if cuda else nullcontext():
        for _ in range(steps):
            step()
    if cuda:
        torch.cuda.current_stream(device).wait_stream(side)
    graph = capture(step) if capture_graph else None
    synchronize(device)
    seconds = time.perf_counter() - t
    _restore(saved, model, optimizer, counter, ema)
    if graph is None:
        optimizer.zero_grad(set_to_none=True)
    return graph, seconds


def enable(run, train_step):
    """The one call train_pytorch makes after set-up. --compile: torch.compile the step's model. On CUDA or with
    --compile: a few warm-up steps before the clock, everything put back after. On one CUDA GPU (run.rates set:
    the optimiser was built with a 0-dim tensor learning rate): run.fast, a FastStep whose step is captured."""
    args = run.args
    if args.compile:
        run.step_model = torch.compile(run.step_model)
    if run.rates is not None:
        run.fast = FastStep(train_step, run.step_model, run.optimizer, run.batches, run.rates, run.ctx,
                            args.label_smoothing, run.ema, args.ema)
        # the warm-up steps run the capturable optimiser eagerly, on purpose
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
        try:
            run.fast.graph, run.warmup_seconds = warm_up(run.fast, run.model, run.optimizer, run.fast.counter,
                                                         capture_graph=True, ema=run.ema)
        except CaptureFailed as err:
            if args.cuda_graphs == "on":
                fail("train_pytorch.py", f"{err}: rerun with --cuda_graphs off")
            raise
    elif not args.dry_run and (run.device.type == "cuda" or args.compile):
        # The batch is drawn inside each warm-up step, so its augmentation's random draws are put back too.
        _, run.warmup_seconds = warm_up(lambda: train_step(run.step_model, run.optimizer, *run.batches.batch(0),
                                                           run.ctx, args.label_smoothing), run.model, run.optimizer)
    if run.warmup_seconds:
        what = ", ".join(w for w in (args.compile and "compiled", run.fast is not None and
                                     "step captured as a CUDA graph") if w) or "warmed up"
        run.say(f"{what} in {run.warmup_seconds:.1f}s: not counted as training time")


def rerun_without_graph(err):
    """CUDA refused the capture: the same command again, in a fresh process, with the plain loop. Not in this
    process: a capture that CUDA rejects can leave the CUDA random generator in capture mode, and the eager
    step would then fail at the first dropout. Nothing was written yet: the capture comes before epoch 1."""
    print(f"train_pytorch.py: {err}; starting again with the plain loop (--cuda_graphs off)", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv, "--cuda_graphs", "off"])
