"""Checkpoint round trips in a fresh process, for every stateful method on both paths.

This process trains ``DONE`` steps, saves the model's and the JDOptimizer's state (the wrapped
Adam's and the aggregator's: EMAs, counters, cached weights, random generators), then trains
``MORE`` steps without interruption. A fresh Python process (``tests/_checkpoint_worker.py``)
loads each checkpoint with ``torch.load(weights_only=True)`` into a model and an optimizer built
from another seed, trains the same ``MORE`` steps, and must end on bit-identical parameters. It
also checks that another method's checkpoint is refused and changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests._checkpoint_worker import DONE, METHODS, MORE, PATHS, build, params, train

ROOT = Path(__file__).resolve().parent.parent


def test_every_stateful_method_resumes_bit_for_bit_in_a_fresh_process(tmp_path: Path) -> None:
    expected = {}
    for method in METHODS:
        for path in PATHS:
            model, opt = build(method, path, seed=1)
            train(model, opt, range(DONE))
            checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}
            torch.save(checkpoint, tmp_path / f"{method}-{path}.pt")
            train(model, opt, range(DONE, DONE + MORE))
            expected[method, path] = params(model)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "tests._checkpoint_worker", str(tmp_path)],
        cwd=ROOT, env=env, check=True, timeout=300,
    )  # fmt: skip
    for (method, path), reference in expected.items():
        resumed = torch.load(tmp_path / f"{method}-{path}.resumed.pt", weights_only=True)
        for a, b in zip(resumed, reference):
            assert torch.equal(a, b), f"{method} on the {path} path did not resume bit for bit"
    assert (tmp_path / "refused.ok").exists()
