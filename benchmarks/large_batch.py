"""Per-sample JD at the batches people train with (128 … 1024): the first step, the steady step
and the peak memory, against a plain step of the same model.

Each measurement runs in a fresh process (its peak resident size, ``VmHWM``, reset before each
step through ``/proc/self/clear_refs``), one per model and side: the plain step (Adam on the
mean loss) and the JD step (``JDOptimizer(Adam, UPGrad(), modules=model, batch_dim=0)``). The
first step of a JD run is the engine's checked one; "steady" is the fastest of the next four,
as a ratio to the plain step's fastest of the same count; the memory is the peak over the five
steps above the resident size before them. Absolute times are this machine's.

Two sets of models:

* ``--models gpt2-tiny,llama-small,…`` at ``--batch N``: the small models of
  :mod:`benchmarks.test_bench_models` (their per-sample losses, ``BENCH_BATCH=N``);
* ``--vocabulary``: transformers' GPT-2 with a real vocabulary (50,257 rows, tied with the
  head), width 128, 2 layers, 32 tokens, at ``--batch N`` (default 64), plain, default and
  ``low_memory=True``: the case where a tied table's rows, ``b`` copies of it, set the memory.

Run from the repository root::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/large_batch.py --models gpt2-tiny --batch 256
    PYTHONPATH=$PWD .venv/bin/python benchmarks/large_batch.py --vocabulary --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _resident_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _timed_steps(step: Callable[[], None], count: int = 5) -> dict:
    """The first step's time, the fastest of the next ones, and the peak extra resident memory
    over all of them."""
    _reset_peak()
    before = _resident_mb("VmRSS")
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _resident_mb("VmHWM") - before
    return {"first": times[0], "peak_mb": peak, "steady": min(times[1:])}


def _bench_model_step(name: str, jd: bool) -> Callable[[], None]:
    sys.path.insert(0, str(ROOT))
    import jdoptim
    from benchmarks.ab_inprocess import make_step

    return make_step(jdoptim if jd else None, name, "per-sample")


def _vocabulary_step(batch: int, mode: str) -> Callable[[], None]:
    import transformers

    import jdoptim
    from jdoptim.aggregation import UPGrad

    vocabulary = 50257
    config = transformers.GPT2Config(
        vocab_size=vocabulary, n_embd=128, n_layer=2, n_head=4, n_positions=64
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, vocabulary, (batch, 32))

    def losses() -> torch.Tensor:
        logits = model(tokens).logits[:, :-1]
        flat = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocabulary), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return flat.view(batch, -1).mean(1)

    adam = torch.optim.Adam(model.parameters(), lr=1e-4)
    if mode == "plain":

        def plain() -> None:
            adam.zero_grad()
            losses().mean().backward()
            adam.step()

        return plain
    opt = jdoptim.JDOptimizer(
        adam, UPGrad(), modules=model, batch_dim=0, low_memory=mode == "low memory"
    )

    def jd() -> None:
        opt.zero_grad()
        opt.step(losses())

    return jd


def _child(spec: dict) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    os.environ["BENCH_BATCH"] = str(spec["batch"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec["kind"] == "model":
            step = _bench_model_step(spec["name"], spec["mode"] == "jd")
        else:
            step = _vocabulary_step(spec["batch"], spec["mode"])
        result = _timed_steps(step)
    result["route_warnings"] = sum(type(w.message).__name__ == "EngineRouteWarning" for w in caught)
    print(json.dumps(result))


def _run(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="")
    parser.add_argument("--vocabulary", action="store_true")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(json.loads(args.child))
        return
    print("| model | batch | first JD step (× plain step) | peak extra memory (MB; plain's) "
          "| steady JD / plain (plain ms) | route warnings |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in filter(None, args.models.split(",")):
        batch = args.batch or 256
        plain = _run({"kind": "model", "name": name, "mode": "plain", "batch": batch})
        jd = _run({"kind": "model", "name": name, "mode": "jd", "batch": batch})
        _row(name, batch, plain, jd)
    if args.vocabulary:
        batch = args.batch or 64
        plain = _run({"kind": "vocabulary", "mode": "plain", "batch": batch})
        for mode in ("default", "low memory"):
            jd = _run({"kind": "vocabulary", "mode": mode, "batch": batch})
            _row(f"gpt2 vocabulary 50257 ({mode})", batch, plain, jd)


def _row(name: str, batch: int, plain: dict, jd: dict) -> None:
    first = f"{jd['first']:.2f} s ({jd['first'] / plain['steady']:.1f}×)"
    memory = f"{jd['peak_mb']:.0f} ({plain['peak_mb']:.0f})"
    steady = f"{jd['steady'] / plain['steady']:.2f}× ({plain['steady'] * 1e3:.1f})"
    print(f"| {name} | {batch} | {first} | {memory} | {steady} | {jd['route_warnings']} |")


if __name__ == "__main__":
    main()
