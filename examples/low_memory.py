"""The Gramian engine's low-memory step: the same update, less memory, one more backward pass.

By default ``JDOptimizer(modules=model)`` keeps every layer's output gradients from its one
backward pass until the weights are known. ``low_memory=True`` takes each layer's Gramian term
during the backward pass instead, lets the gradient go, and runs a second backward pass of
``Σ wᵢ ℓᵢ`` for the update. This script trains a small CNN both ways from the same
initialisation on the same batches, prints the peak memory of one step's tensors for each (on
CUDA the allocator's peak, on the CPU torch.profiler's allocation events) and checks that the
two runs take the same steps. (A plain summed step is measured too, for reference.)

Run: ``python examples/low_memory.py``
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


def small_cnn(tasks: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.GroupNorm(8, 32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, tasks),
    )


def peak_tensor_mb(step: Callable[[], None], device: torch.device) -> float:
    """The peak of the tensor memory ``step`` allocates on top of what exists before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    assert prof.profiler is not None
    events = prof.profiler.kineto_results.events()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def train(
    model: nn.Module, images: Tensor, targets: Tensor, low_memory: bool
) -> tuple[float, list[Tensor]]:
    """JD steps on the batches; the peak tensor memory of the last one and every step's
    weights."""
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        UPGrad(),
        modules=model,
        low_memory=low_memory,
    )
    weights = []

    def step(k: int) -> None:
        losses = (model(images[k]) - targets[k]).pow(2).mean(0)  # one loss per task
        opt.zero_grad()
        record = opt.step(losses)
        assert record.weights is not None
        weights.append(record.weights)

    for k in range(len(images) - 1):
        step(k)
    peak = peak_tensor_mb(lambda: step(len(images) - 1), images.device)
    return peak, weights


def main(steps: int = 4, batch: int = 32, tasks: int = 4) -> dict[str, float]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = small_cnn(tasks).to(device)
    images = torch.randn(steps, batch, 3, 16, 16, device=device)
    targets = torch.randn(steps, batch, tasks, device=device)
    plain_model = copy.deepcopy(base)
    sgd = torch.optim.SGD(plain_model.parameters(), lr=0.05)

    def plain_step() -> None:  # for reference: the summed loss, no JD
        sgd.zero_grad()
        (plain_model(images[0]) - targets[0]).pow(2).mean(0).sum().backward()
        sgd.step()

    plain_step()
    peaks = {"plain": peak_tensor_mb(plain_step, device)}
    peaks["default"], default_weights = train(copy.deepcopy(base), images, targets, False)
    peaks["low_memory"], low_weights = train(copy.deepcopy(base), images, targets, True)
    for name, label in [
        ("plain", "plain summed step"),
        ("default", "JD, default"),
        ("low_memory", "JD, low_memory=True"),
    ]:
        print(f"{label:20s}: peak step tensors {peaks[name]:6.2f} MB")
    for ordinary, low in zip(default_weights, low_weights):  # the same trajectory
        torch.testing.assert_close(ordinary, low, rtol=1e-4, atol=1e-5)
    print(f"the same {steps} steps both ways ({tasks} task losses, batch {batch}, {device})")
    return peaks


if __name__ == "__main__":
    main()
