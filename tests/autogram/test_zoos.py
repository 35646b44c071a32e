"""The zoos in CI: every entry of ``benchmarks/layer_zoo.py`` and a subset of
``benchmarks/model_zoo.py``'s architectures, at batch 3, through the zoos' own checks.

Each (model, layout) runs three steps with an ``Engine`` and a ``JDOptimizer`` on the same model,
every step against the explicit Jacobian of the same losses (float64, dropout active): no row
may be wrong, crash, or be refused without naming a module or parameter by its path in the
model (a slower exact route, warned, is allowed: the zoos report those). The whole model zoo
(86 architectures, three batch sizes) takes minutes; this subset is the architectures people
train most, and the ones whose fixes the zoo found (RESULTS.md, "The model zoo"; WavLM, whose
attention folds the samples differently in its two outputs; DeBERTa v1, whose attention has
parameters of its own around its projections; CvT, whose stages draw dropout masks on permuted
views).
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import layer_zoo
from benchmarks import model_zoo as zoo

#: model-zoo architectures run in CI (the rest: ``benchmarks/model_zoo.py``)
MODELS = [
    "mistral",
    "qwen2",
    "gemma2",
    "phi3",
    "roberta",
    "deberta_v2",
    "deberta",
    "albert",
    "distilbert",
    "mpnet",
    "modernbert",
    "whisper",
    "convnext",
    "cvt",
    "led",
    "reformer",
    "wavlm",
    # on the per-sample path since the twenty-fourth session (no route warning allowed):
    # fairseq-style sequence-first attention, token-routed experts (gathered entries), a
    # per-layer part of a stacked shared output, a scan torch.func cannot run
    "fsmt",
    "switch_transformers",
    "jetmoe",
    "xmod",
    "yolos",
    "recurrent_gemma",
]
#: the architectures whose rows must also take no slower route (no EngineRouteWarning)
ON_THE_FAST_PATH = {"fsmt", "switch_transformers", "jetmoe", "xmod", "yolos", "recurrent_gemma"}


def _problems(rows: list[zoo.Row]) -> list[str]:
    bad = [r for r in rows if r.flagged or r.outcome in ("TIMEOUT", "SKIPPED")]
    return [f"{r.model} / {r.layout}: {r.outcome} {zoo.detail(r)[:300]}" for r in bad]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_model_zoo_subset(name: str) -> None:
    assert name in zoo.MODELS
    rows = zoo.sweep_model(name, 3, list(zoo.LAYOUTS))
    if rows[0].outcome == "BUILD":  # (this transformers cannot build or run it, without jdoptim)
        pytest.skip(f"{name}: {rows[0].message[:200]}")
    assert not _problems(rows)
    if name in ON_THE_FAST_PATH:
        assert not [(r.layout, r.route_warnings) for r in rows if r.route_warnings]


@pytest.fixture
def layer_entries(monkeypatch: pytest.MonkeyPatch) -> dict:
    """model_zoo's machinery pointed at the layer zoo (as its ``install`` does), undone after."""
    monkeypatch.setattr(zoo, "MODELS", layer_zoo.LAYERS)
    for name, layout in layer_zoo.SEQUENCE_FIRST_LAYOUTS.items():
        monkeypatch.setitem(zoo.LAYOUTS, name, layout)
    monkeypatch.setattr(zoo, "build", layer_zoo.build)
    monkeypatch.setattr(zoo, "explicit_jacobian", layer_zoo.dense_jacobian)
    monkeypatch.setattr(zoo, "flat_grads", layer_zoo.dense_grads)
    return layer_zoo.LAYERS


@pytest.mark.slow
def test_layer_zoo(layer_entries: dict) -> None:
    problems = []
    for name in layer_entries:
        rows = layer_zoo.sweep(name, 3, layer_zoo.layouts_of(name))
        built = [f"{r.model}: {r.message}" for r in rows if r.outcome == "BUILD"]  # (torch only)
        problems += _problems(rows) + built
    assert not problems, "\n".join(problems)
