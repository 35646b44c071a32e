"""A/B of two versions of the library in one process: a base commit against the working tree.

On these shared machines the speed of a whole process drifts by ±10% from one run to the next,
so the same step timed in two processes (alternating base and new, as the earlier A/Bs in
``RESULTS.md`` did) needs many processes to resolve a 2% change. Here both versions run in the
same process, round by round: the base commit's ``jdoptim`` package is extracted (``git
archive``) into a temporary directory under the name ``jdoptim_base`` (every import inside the
package is relative, so the copy imports itself), each version gets its own model built from
the same seed, and every round times a base step, a new step and a plain step in alternating
order. The medians of the per-round ratios ``new / base``, ``base / plain`` and ``new / plain``
are printed: the first is the change (resolving about 0.5% here), the others the usual ratios.

Run: ``PYTHONPATH=$PWD python benchmarks/ab_inprocess.py BASE_COMMIT "model:setting,..."
[ROUNDS]``, e.g. ``... fc5a57d "llama-small:per-sample,gpt2-tiny:2 tasks" 80`` (models and
settings of :mod:`benchmarks.test_bench_models`).
"""

from __future__ import annotations

import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.test_bench_models import SETTINGS, THREADS, build

ROOT = Path(__file__).resolve().parent.parent


def import_base(commit: str) -> object:
    """The ``jdoptim`` package of ``commit``, imported as ``jdoptim_base``."""
    target = Path(tempfile.mkdtemp(prefix="jdoptim_base_"))
    archive = subprocess.run(
        ["git", "archive", commit, "jdoptim"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    (target / "jdoptim").rename(target / "jdoptim_base")
    sys.path.insert(0, str(target))
    return importlib.import_module("jdoptim_base")


def make_step(library: object | None, model_name: str, setting: str) -> Callable[[], None]:
    """One training step of ``library`` (a ``jdoptim`` package; ``None``: the plain step)."""
    model, losses = build(model_name, setting)
    model.train()
    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch_dim = 0 if SETTINGS[setting] == 0 else None
    if library is None:

        def plain() -> None:
            adam.zero_grad()
            value = losses(model)
            (value.mean() if batch_dim == 0 else value.sum()).backward()
            adam.step()

        return plain
    upgrad = importlib.import_module(f"{library.__name__}.aggregation").UPGrad  # type: ignore[attr-defined]
    opt = library.JDOptimizer(adam, upgrad(), modules=model, batch_dim=batch_dim)  # type: ignore[attr-defined]

    def jd() -> None:
        opt.zero_grad()
        opt.step(losses(model))

    return jd


def compare(base: object, model_name: str, setting: str, rounds: int) -> dict[str, float]:
    """Median per-round ratios ``new / base``, ``base / plain``, ``new / plain``."""
    import jdoptim

    steps = {
        "base": make_step(base, model_name, setting),
        "new": make_step(jdoptim, model_name, setting),
        "plain": make_step(None, model_name, setting),
    }
    for _ in range(5):
        for step in steps.values():
            step()
    ratios: dict[str, list[float]] = {"new/base": [], "base/plain": [], "new/plain": []}
    for index in range(rounds):
        order = ["base", "new", "plain"] if index % 2 == 0 else ["new", "base", "plain"]
        times = {}
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name] = time.perf_counter() - start
        ratios["new/base"].append(times["new"] / times["base"])
        ratios["base/plain"].append(times["base"] / times["plain"])
        ratios["new/plain"].append(times["new"] / times["plain"])
    return {key: statistics.median(values) for key, values in ratios.items()}


def main() -> None:
    torch.set_num_threads(THREADS)
    commit, items = sys.argv[1], sys.argv[2]
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    base = import_base(commit)
    print(f"| model | setting | new / base ({commit}) | base / plain | new / plain |")
    print("|---|---|---|---|---|")
    for item in items.split(","):
        model_name, setting = item.split(":")
        found = compare(base, model_name, setting, rounds)
        print(
            f"| {model_name} | {setting} | {found['new/base']:.3f} | {found['base/plain']:.2f}× "
            f"| {found['new/plain']:.2f}× |"
        )


if __name__ == "__main__":
    main()
