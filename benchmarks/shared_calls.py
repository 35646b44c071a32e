"""GPT-2 tiny per-sample JD step with and without the engine's expansion of sample-shared calls.

transformers' ``GPT2LMHeadModel`` (2 layers, width 32, 2 heads, vocabulary 512), batch 8,
sequence 16, per-sample next-token cross-entropy, ``JDOptimizer(Adam, UPGrad(), batch_dim=0)``.
Its position embedding ``wpe(arange(16)[None])`` (``[1, 16, 32]``) is shared by the samples:

* *with the route* (the default), the engine's hook expands it along the batch, and the step is
  per-sample (one backward pass);
* *without* (expansion switched off in the same process), the step takes the exact row-per-loss
  route (``b = 8`` backward rows), which is what every step did before the route existed.

Prints the tensor operations of one step of each (deterministic), then interleaved timings of
each against a plain step in the same run. Run:
``PYTHONPATH=$PWD python benchmarks/shared_calls.py [--rounds 30]`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interleave import interleaved_ratio
from benchmarks.op_count import OperationCounter
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import EngineRouteWarning


class _NeverExpand(dict):
    """An ``expandable`` dict that stays empty: the engine never expands a call."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


def _model_and_losses():
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(vocab_size=512, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).train()
    tokens = torch.randint(0, 512, (8, 16))

    def losses() -> torch.Tensor:
        logits = model(tokens).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1), reduction="none")
        return ce.view(8, -1).mean(1)

    return model, losses


def make_steps() -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    model, losses = _model_and_losses()
    steps: dict[str, Callable[[], None]] = {}
    plain_opt = torch.optim.Adam(model.parameters(), lr=1e-5)

    def plain() -> None:
        plain_opt.zero_grad()
        losses().mean().backward()
        plain_opt.step()

    steps["plain"] = plain
    for name, expand in [("JD, shared call expanded", True), ("JD, rows per loss", False)]:
        opt = JDOptimizer(
            torch.optim.Adam(model.parameters(), lr=1e-5), UPGrad(), modules=model, batch_dim=0
        )
        if not expand:
            opt._update_computer.engine._shared.expandable = _NeverExpand()  # type: ignore

        def jd(opt: JDOptimizer = opt) -> None:
            opt.zero_grad()
            opt.step(losses())

        steps[name] = jd
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EngineRouteWarning)
    steps = make_steps()
    print("| step | operations | ms (median) | ratio to plain (interleaved) |")
    print("|---|---|---|---|")
    for name, step in steps.items():
        for _ in range(3):
            step()
        with OperationCounter() as counter:
            step()
        if name == "plain":
            print(f"| {name} | {counter.total} | | 1 |")
            continue
        timing = interleaved_ratio(step, steps["plain"], rounds=rounds)
        print(
            f"| {name} | {counter.total} | {timing['candidate_ms']:.1f} | "
            f"{timing['ratio_median']:.2f} |"
        )


if __name__ == "__main__":
    main()
