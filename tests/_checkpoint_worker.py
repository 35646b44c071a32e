"""Checkpoint round trips, resumed in a fresh process (see ``test_checkpoint_roundtrip.py``).

``python -m tests._checkpoint_worker DIR`` loads every checkpoint that the test saved in
``DIR`` into a freshly built model and optimizer (whose aggregator was seeded differently), runs
the remaining steps, and writes the final parameters next to it; it also checks that loading a
checkpoint of another method is refused without changing anything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from jdoptim import JDOptimizer
from jdoptim.aggregation import (
    DBMTL,
    IMTL,
    PCD,
    Aggregator,
    CRMOGMWeighting,
    ExcessMTL,
    GradDrop,
    GradNorm,
    GradVac,
    GramianWeightedAggregator,
    MoCo,
    NashMTL,
    PCGrad,
    Random,
    UPGradWeighting,
)
from tests.models import MultiTaskMLP, task_losses

#: Each stateful method, built from a seed (the resumed run uses another one: the checkpoint
#: must override it).
METHODS: dict[str, Callable[[int], Aggregator]] = {
    "gradvac": lambda seed: GradVac(beta=0.5, seed=seed),
    "nashmtl": lambda seed: NashMTL(max_norm=0.5, update_weights_every=2),
    "pcgrad": lambda seed: PCGrad(seed=seed),
    "random": lambda seed: Random(seed=seed),
    "excessmtl": lambda seed: ExcessMTL(),
    "graddrop": lambda seed: GradDrop(seed=seed),
    # The methods of issue 17 (their state: EMAs, learned weights, tracked gradients).
    "crmogm": lambda seed: GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting())),
    "pcd": lambda seed: PCD(),
    "gradnorm": lambda seed: GradNorm(),
    "imtl": lambda seed: IMTL(),
    "dbmtl": lambda seed: DBMTL(),
    "moco": lambda seed: MoCo(),
}
PATHS = ("jacobian", "engine")
DONE, MORE = 3, 3


def build(method: str, path: str, seed: int) -> tuple[MultiTaskMLP, JDOptimizer]:
    torch.manual_seed(seed)
    model = MultiTaskMLP(n_tasks=3).double()
    adam = torch.optim.Adam(model.parameters(), lr=0.02)
    modules = model if path == "engine" else None
    return model, JDOptimizer(adam, METHODS[method](seed), modules=modules)


def data(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    x = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(10, 3, generator=generator, dtype=torch.float64)


def train(model: MultiTaskMLP, opt: JDOptimizer, steps: range) -> None:
    for step in steps:
        x, y = data(step)
        opt.zero_grad()
        opt.step(task_losses(model, x, y))


def params(model: MultiTaskMLP) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def resume(directory: Path) -> None:
    for method in METHODS:
        for path in PATHS:
            checkpoint = torch.load(directory / f"{method}-{path}.pt", weights_only=True)
            model, opt = build(method, path, seed=99)  # another seed, another start
            model.load_state_dict(checkpoint["model"])
            opt.load_state_dict(checkpoint["opt"])
            train(model, opt, range(DONE, DONE + MORE))
            torch.save(params(model), directory / f"{method}-{path}.resumed.pt")
    refuse(directory)


def refuse(directory: Path) -> None:
    """A GradVac checkpoint loaded into a PCGrad optimizer: refused, nothing changed."""
    from tests._snapshots import assert_unchanged, snapshot

    checkpoint = torch.load(directory / "gradvac-jacobian.pt", weights_only=True)
    model, opt = build("pcgrad", "jacobian", seed=5)
    train(model, opt, range(2))
    before = snapshot(model, opt)
    try:
        opt.load_state_dict(checkpoint["opt"])
    except ValueError as error:
        assert "GradVac" in str(error) and "PCGrad" in str(error), str(error)
    else:
        raise AssertionError("a GradVac checkpoint was loaded into a PCGrad optimizer")
    assert_unchanged(model, opt, before)
    (directory / "refused.ok").write_text("ok")


if __name__ == "__main__":
    resume(Path(sys.argv[1]))
