"""What makes the training step fast on a GPU: the whole step captured once as a CUDA graph and replayed.

Read train_pytorch.py first: its train_step() (forward, loss, backward, optimiser step) is the step, and its
epoch loop is the plain way to run it, used on the CPU, on Apple's MPS and under torchrun. On one CUDA GPU the
plain loop leaves the GPU waiting on Python between small kernels, so train_pytorch switches this module on
with one call, enable(), and FastStep runs the same train_step with everything around it moved onto the device:

- the batch is picked by a step counter that lives on the device (TrainBatches.batch takes a device index);
- the learning rate is a 0-dim tensor that the step copies from LearningRates' device table by that counter,
  instead of a Python float a scheduler writes into the optimiser between steps;
- the running loss and accuracy are summed on the device, never read back inside the epoch;
- with --ema, the moving average of the weights is updated on the device too (DeviceEMA).

Then nothing in a step needs the host, so one step can be captured as a CUDA graph and every later step is one
graph replay. warm_up() takes a few real steps before the clock starts (cuDNN autotuning, lazy initialisation,
torch.compile), captures the graph, and puts every weight, optimiser moment, counter and random state back, so
the run is the run it would have been without the warm-up. The contract with the plain loop is tested in
tests/test_train.py: FastStep trains as train_pytorch's loop does, and replayed as a graph as it does eagerly.
"""
import itertools
import time
import warnings
from contextlib import nullcontext

import torch

from checkpoint import unwrap
from common import random_state, set_random_state, synchronize

WARM_UP_STEPS = 3  # cuDNN autotune, lazy initialisation, compilation: all done before the clock starts


class CaptureFailed(RuntimeError):
    """CUDA refused to capture the step. The run cannot go on in this process: a capture that CUDA rejects
    can leave the CUDA random generator in capture mode, and the eager step would then fail at the first
    dropout. Rerunning with --cuda_graphs off trains the same run without a graph."""


class LearningRates:
    """The learning rate of every step of the run, as one float32 tensor on the device that the step indexes.

    PyTorch's own schedulers compute the values (the same schedulers as train_pytorch's plain loop), driving a
    stand-in optimiser that holds one dummy parameter: they write Python floats into their optimiser, which a
    CUDA graph could not see. Per-batch schedules (onecycle, cosine) fill the whole table up front; per-epoch
    ones (step, plateau) fill the next epoch's rows when an epoch ends, since plateau needs that epoch's
    validation loss.
    """

    def __init__(self, make_scheduler, base_lr, total_steps, steps_per_epoch, device):
        self.steps_per_epoch = steps_per_epoch
        self._stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
        self.scheduler, self.per_batch = make_scheduler(self._stand_in)
        self.plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        values = self._per_batch_values(total_steps) if self.per_batch else [self.current()] * total_steps
        self.table = torch.tensor(values, dtype=torch.float32, device=device)

    def current(self):
        return self._stand_in.param_groups[0]["lr"]

    def _step(self, *metric):
        with warnings.catch_warnings():  # the stand-in never steps: PyTorch's "step order" warning is moot here
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*optimizer.step", category=UserWarning)
            self.scheduler.step(*metric)

    def _per_batch_values(self, total):
        values = []
        for i in range(total):
            values.append(self.current())
            if i + 1 < total:  # OneCycleLR refuses to step past its last step
                self._step()
        return values

    def end_epoch(self, epoch, val_loss):
        """After epoch `epoch` (1-based): the per-epoch schedules set the rate of the epochs that follow."""
        if self.scheduler is None or self.per_batch:
            return
        self._step(val_loss) if self.plateau else self._step()
        self.table[epoch * self.steps_per_epoch:].fill_(self.current())

    def used_in(self, epoch):
        """The rate of the last step of epoch `epoch` (for the history)."""
        return self.table[epoch * self.steps_per_epoch - 1].item()

    def state_dict(self):
        """The per-epoch scheduler's state (a per-batch schedule is rebuilt from the settings alone)."""
        return {"scheduler": None if self.scheduler is None or self.per_batch else self.scheduler.state_dict()}

    def load_state_dict(self, state, start_epoch):
        saved = state.get("scheduler")
        if self.scheduler is None or self.per_batch or saved is None:
            return
        self.scheduler.load_state_dict(saved)
        # Loading a scheduler does not touch its optimiser: the rate it had reached is put back by hand.
        self._stand_in.param_groups[0]["lr"] = self.scheduler.get_last_lr()[0]
        self.table[start_epoch * self.steps_per_epoch:].fill_(self.current())


class DeviceEMA:
    """The update of train_pytorch's AveragedModel(model, get_ema_multi_avg_fn(decay), use_buffers=True), with
    nothing read back to the host, into that AveragedModel's own tensors (so checkpoints and --resume are the
    same whichever path trained).

    AveragedModel.update_parameters asks the host `if n_averaged == 0` (the first update copies the model, the
    later ones average): a device value read back at every step, and a captured graph would replay whichever
    branch it saw at capture. Here the branch is a number on the device instead: one torch._foreach_lerp_ over
    the weight and buffer lists, by 1 on the first update (PyTorch's lerp returns the end point exactly at 1)
    and by 1 - decay after, chosen with torch.where on the average's own n_averaged, moved to the device. The
    integer buffers (batch norm's num_batches_tracked) get AveragedModel's own formula for them.
    """

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

    def __init__(self, train_step, model, optimizer, batches, lrs, ctx, label_smoothing, mark_cudagraph_step=False,
                 ema=None, ema_decay=0.0):
        device = batches.images.device
        self.train_step, self.model, self.optimizer, self.batches = train_step, model, optimizer, batches
        self.lrs, self.ctx, self.label_smoothing = lrs, ctx, label_smoothing
        self.mark_cudagraph_step = mark_cudagraph_step
        self.lr = optimizer.param_groups[0]["lr"]  # the 0-dim tensor every parameter group shares
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # steps taken since the run began
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        # ema: train_pytorch's AveragedModel (made with get_ema_multi_avg_fn(ema_decay)) or None, updated in place
        self.ema = DeviceEMA(ema, unwrap(model), ema_decay) if ema is not None else None

    def __call__(self):
        if self.mark_cudagraph_step:  # torch.compile's own CUDA graphs: a new step, old outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
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

    def run_epoch(self, epoch, steps, bar=None):
        """`steps` steps of epoch `epoch`, replayed from the graph when there is one; returns the device sums."""
        self.start_epoch(epoch)
        take = self.graph.replay if self.graph is not None else self
        for _ in range(steps):
            take()
            if bar is not None:
                bar.update(1)
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
                            f"({' '.join(str(err).split())[:160]}): rerun with --cuda_graphs off") from None
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


def enable(train_step, model, optimizer, batches, lrs, ctx, label_smoothing, capture_graph, mark_cudagraph_step,
           ema=None, ema_decay=0.0):
    """The one call train_pytorch makes: a FastStep, warmed up and (with capture_graph) captured; returns
    (the step, warm-up seconds). The optimiser must have been built with a 0-dim tensor learning rate; ema is
    the run's AveragedModel (--ema, with its decay) or None."""
    fast = FastStep(train_step, model, optimizer, batches, lrs, ctx, label_smoothing, mark_cudagraph_step, ema,
                    ema_decay)
    if capture_graph:  # the warm-up steps run the capturable optimiser eagerly, on purpose
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
    fast.graph, seconds = warm_up(fast, unwrap(model), optimizer, fast.counter, capture_graph, ema=ema)
    return fast, seconds

