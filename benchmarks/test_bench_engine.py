"""The Gramian engine: a JD step with ``JDOptimizer(modules=model)`` vs a plain Adam step.

Model: the shared MLP trunk 256→512→512→256 of :mod:`benchmarks.models` (ReLU), Adam, 2 threads.

* per-sample losses (batch 16, 64, 128, 256, 512): one head, ``batch_dim=0``,
  ``step((out - y)²)``, against ``((out - y)²).mean().backward()``; from batch 128 on, UPGrad,
  DualProj and Mean only, with TorchJD's autogram step up to batch 256 and its autojac step up to
  batch 128 (beyond, a step takes tens of seconds), and fewer rounds (:func:`rounds_for`);
* task losses (2, 8 tasks, batch 128): one head per task, ``step(task_losses)``, against
  ``sum(task_losses).backward()``.

Each JD step is timed alternately with its plain step
(:func:`benchmarks.interleave.interleaved_ratio`) and reported as the median ratio: absolute
times are noise on these shared machines. Where
TorchJD is installed (benchmark only, never a dependency), its autogram (``Engine`` +
``compute_gramian`` + ``losses.backward(weights)``) and autojac (``backward``/``mtl_backward`` +
``jac_to_grad``) steps are timed the same way. Peak extra memory is measured in a fresh process per
(case, method) as ``ru_maxrss`` after five steps minus the resident size before the first.

Run: ``python -m pytest benchmarks/test_bench_engine.py --benchmark-only -q`` (pytest-benchmark
timings with the ratios in ``extra_info``), or ``python benchmarks/test_bench_engine.py`` for the
markdown table of ``RESULTS.md`` (``python benchmarks/test_bench_engine.py "batch 128" "batch 256"``
for some rows only).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hand_fused import HandFusedStep, check_against_jdoptim
from benchmarks.interleave import interleaved_ratio
from benchmarks.models import TrunkWithHeads, make_batch, task_losses
from jdoptim import JDOptimizer
from jdoptim.aggregation import DualProj, Mean, UPGrad
from jdoptim.autogram import Engine

CASES = {
    "per-sample losses, batch 16": ("sample", 16),
    "per-sample losses, batch 64": ("sample", 64),
    "per-sample losses, batch 128": ("sample", 128),
    "per-sample losses, batch 256": ("sample", 256),
    "per-sample losses, batch 512": ("sample", 512),
    "2 task losses, batch 128": ("task", 2),
    "8 task losses, batch 128": ("task", 8),
}
#: Intra-op threads (2 as in the issue's table; ``BENCH_THREADS=1`` where the machine is so loaded
#: that two-thread barriers stall for whole scheduler quanta).
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
METHODS = [
    "plain, hooked",
    "jdoptim UPGrad",
    "jdoptim Mean",
    "jdoptim DualProj",
    "hand-fused UPGrad",
    "torchjd autogram",
    "torchjd autojac",
]


def _has_torchjd() -> bool:
    try:
        import torchjd  # noqa: F401
    except ImportError:
        return False
    return True


def make_step(case: str, method: str) -> Callable[[], None]:
    """A closure running one training step of ``method`` on a fresh model for ``case``."""
    kind, n = CASES[case]
    torch.manual_seed(0)
    if kind == "sample":
        model = TrunkWithHeads(1)
        x, y = make_batch(1, batch=n)
        y = y[:, 0]

        def loss_of(net: TrunkWithHeads) -> torch.Tensor | list[torch.Tensor]:
            return (net(x)[0] - y).pow(2)
    else:
        model = TrunkWithHeads(n)
        x, y = make_batch(n, batch=128)

        def loss_of(net: TrunkWithHeads) -> torch.Tensor | list[torch.Tensor]:
            return task_losses(net, x, y)

    def losses() -> torch.Tensor | list[torch.Tensor]:
        return loss_of(model)

    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    if method == "plain, hooked":  # a plain step through a model an engine has hooked
        engine = Engine(model, batch_dim=0 if kind == "sample" else None)
        method = "plain"
        model._bench_engine = engine  # type: ignore[attr-defined]  (kept alive with the model)
    if method == "plain":

        def step() -> None:
            adam.zero_grad()
            value = losses()
            (value.mean() if kind == "sample" else sum(value)).backward()
            adam.step()

        return step
    if method == "hand-fused UPGrad":
        check_against_jdoptim(model, UPGrad(), loss_of, per_sample=kind == "sample")
        fused = HandFusedStep(model, adam, UPGrad(), per_sample=kind == "sample")

        def fused_step() -> None:
            fused.zero_grad()
            fused.step(losses())

        return fused_step
    if method.startswith("jdoptim"):
        aggregator = {"UPGrad": UPGrad, "DualProj": DualProj, "Mean": Mean}[method.split()[-1]]()
        opt = JDOptimizer(
            adam, aggregator, modules=model, batch_dim=0 if kind == "sample" else None
        )

        def step() -> None:
            opt.zero_grad()
            opt.step(losses())

        return step
    return _torchjd_step(method, kind, model, adam, losses)


def _torchjd_step(method, kind, model, adam, losses) -> Callable[[], None]:
    from torchjd.aggregation import UPGrad as TjdUPGrad
    from torchjd.aggregation import UPGradWeighting as TjdUPGradWeighting

    if method == "torchjd autogram":
        from torchjd.autogram import Engine as TjdEngine

        engine = TjdEngine(model, batch_dim=0 if kind == "sample" else None)
        weighting = TjdUPGradWeighting()

        def step() -> None:
            adam.zero_grad()
            value = losses()
            vector = value if kind == "sample" else torch.stack(value)
            gramian = engine.compute_gramian(vector)
            vector.backward(weighting(gramian))
            adam.step()

        return step
    from torchjd.autojac import backward, jac_to_grad, mtl_backward

    aggregator = TjdUPGrad()
    trunk = list(model.trunk.parameters())

    def step() -> None:
        adam.zero_grad()
        if kind == "sample":
            backward(losses())
        else:
            features = model.trunk(model_input[0])
            outs = [h(features).squeeze(-1) for h in model.heads]
            values = [(o - model_input[1][:, t]).pow(2).mean() for t, o in enumerate(outs)]
            mtl_backward(values, features=features)
        jac_to_grad(trunk if kind != "sample" else list(model.parameters()), aggregator)
        adam.step()

    model_input = make_batch(len(model.heads), batch=128)
    return step


#: Largest per-sample batch each TorchJD step is run at (a step beyond takes tens of seconds).
_TORCHJD_UP_TO = {"torchjd autogram": 256, "torchjd autojac": 128}


def rounds_for(case: str, rounds: int = 20) -> int:
    """Interleaved rounds: ``rounds`` up to batch 128, fewer for the larger per-sample batches."""
    kind, n = CASES[case]
    return rounds if kind == "task" or n <= 128 else max(5, rounds // (n // 64))


def measure_ratio(case: str, method: str, rounds: int = 20) -> dict[str, float]:
    rounds = rounds_for(case, rounds)
    return interleaved_ratio(make_step(case, method), make_step(case, "plain"), rounds=rounds)


def _available(method: str, case: str | None = None) -> bool:
    """Whether ``method`` runs (at all, or for ``case``): TorchJD where installed and up to its
    batch limit; from per-sample batch 128 on, jdoptim's UPGrad, DualProj and Mean only."""
    if method.startswith("torchjd") and not _has_torchjd():
        return False
    if case is None:
        return True
    kind, n = CASES[case]
    if kind == "task" or n <= 64:
        return True
    if method.startswith("torchjd"):
        return n <= _TORCHJD_UP_TO[method]
    return method.startswith("jdoptim") or method == "plain, hooked"


@pytest.fixture(autouse=True)
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_engine_step(benchmark, case: str, method: str) -> None:
    if not _available(method, case):
        pytest.skip("torchjd is not installed, or not run at this batch size")
    benchmark.group = f"engine: {case}"
    benchmark.extra_info.update(measure_ratio(case, method))
    benchmark(make_step(case, method))


def _peak_extra_mb(case: str, method: str) -> float:
    """In a fresh process: the peak resident size over 5 steps (``VmHWM``, reset through
    ``/proc/self/clear_refs`` just before them) minus the resident size before them."""
    code = (
        f"import json, sys, torch; torch.set_num_threads({THREADS});"
        "from benchmarks.test_bench_engine import make_step, _rss_mb, _peak_mb;"
        f"step = make_step({case!r}, {method!r}); before = _rss_mb();"
        "open('/proc/self/clear_refs', 'w').write('5');"
        "[step() for _ in range(5)];"
        "print(json.dumps(_peak_mb() - before))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def _peak_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(row for row in handle if row.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main(selected: list[str]) -> None:
    """Print the tables; ``selected``: substrings of the cases to run (all when empty)."""
    torch.set_num_threads(THREADS)
    methods = [m for m in METHODS if _available(m)]
    print("| case | plain step (ms) | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for case in CASES:
        if selected and not any(part in case for part in selected):
            continue
        cells, plain = [], []
        for method in methods:
            if not _available(method, case):
                cells.append("–")
                continue
            result = measure_ratio(case, method, rounds=40)
            plain.append(result["baseline_ms"])
            cells.append(f"{result['ratio_median']:.2f}×")
        print(f"| {case} | {sorted(plain)[len(plain) // 2]:.1f} | " + " | ".join(cells) + " |")
    print()
    # The hand-fused step's check runs JDOptimizer before the memory baseline is read.
    memory_methods = [m for m in methods if not m.startswith("hand-fused")]
    print("| peak extra memory (MB) | plain | " + " | ".join(memory_methods) + " |")
    print("|---|---|" + "---|" * len(memory_methods))
    for case in ("8 task losses, batch 128", "per-sample losses, batch 64"):
        row = [_peak_extra_mb(case, m) for m in ["plain", *memory_methods]]
        print(f"| {case} | " + " | ".join(f"{v:.0f}" for v in row) + " |")
    print(json.dumps({"torch": torch.__version__, "threads": THREADS}))


if __name__ == "__main__":
    main(sys.argv[1:])
