"""A family of ``m × m`` Gramians for the weightings' benchmark and the tests, not one matrix.

Every member is generated deterministically on demand (float32, as a training step makes them)
and its leading ``m × m`` block is its Gramian at batch ``m`` (``m ≤ 1024``):

* **real per-sample Gramians** (``G = J Jᵀ`` of the per-sample losses of one step, computed by
  :class:`jdoptim.autogram.Engine`) of three models, at initialisation and after
  :data:`TRAINED_STEPS` Adam steps on a fixed synthetic task:

  - ``mlp``: the benchmark MLP 256→512→512→256→1 (:mod:`benchmarks.models`), per-sample MSE
    against a fixed teacher network;
  - ``cnn``: two 3×3 convolutions and a linear head on 1×12×12 images, per-sample cross-entropy
    over 10 classes given by a teacher;
  - ``transformer``: an embedding, one attention block (single head, residual, LayerNorm) and a
    mean-pooled linear head on sequences of 8 tokens, per-sample cross-entropy;

* **synthetic**: ``random`` (Gaussian rows, ``n = 4096``), ``rank_deficient`` (rank ``m/4``:
  batch larger than the rank), ``ill_conditioned`` (singular values from 1 to 1e-6, so
  ``cond(G) = 1e12``), ``duplicated`` (every sample twice, rows in a shuffled order).

Real Gramians take a few seconds to make (the training), so the ``1024 × 1024`` matrix of each is
cached under ``benchmarks/.gramian_cache`` (ignored by git through a ``.gitignore`` written
there); delete the folder to regenerate. The synthetic ones are cheap and never cached.

Use: ``gramian("mlp-trained", 256)``; ``FAMILIES`` lists the names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_M = 1024
TRAINED_STEPS = 300
_TRAIN_BATCH = 64
_CACHE = Path(__file__).resolve().parent / ".gramian_cache"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- models and tasks -------------------------------------------------------------------------


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(z.flatten(1))


class _SmallTransformer(nn.Module):
    def __init__(self, vocab: int = 32, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)  # [b, s, w]
        scores = self.query(h) @ self.key(h).transpose(1, 2) / h.shape[-1] ** 0.5
        h = self.norm(h + torch.softmax(scores, dim=-1) @ self.value(h))
        return self.head(h.mean(dim=1))


def _mlp_task(size: int, seed: int) -> tuple[nn.Module, Tensor, Tensor, Callable]:
    from benchmarks.models import TrunkWithHeads

    torch.manual_seed(seed)
    model, teacher = TrunkWithHeads(1), TrunkWithHeads(1)
    x = torch.randn(size, 256, generator=_generator(seed))
    with torch.no_grad():
        y = teacher(x)[0]
        y = (y - y.mean()) / y.std()

    def losses(net: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return (net(xb)[0] - yb).pow(2)

    return model, x, y, losses


def _classification_task(
    model: nn.Module, teacher: nn.Module, x: Tensor
) -> tuple[nn.Module, Tensor, Tensor, Callable]:
    with torch.no_grad():
        y = teacher(x).argmax(dim=1)

    def losses(net: nn.Module, xb: Tensor, yb: Tensor) -> Tensor:
        return nn.functional.cross_entropy(net(xb), yb, reduction="none")

    return model, x, y, losses


def _cnn_task(size: int, seed: int) -> tuple[nn.Module, Tensor, Tensor, Callable]:
    torch.manual_seed(seed)
    model, teacher = _SmallCNN(), _SmallCNN()
    return _classification_task(model, teacher, torch.randn(size, 1, 12, 12))


def _transformer_task(size: int, seed: int) -> tuple[nn.Module, Tensor, Tensor, Callable]:
    torch.manual_seed(seed)
    model, teacher = _SmallTransformer(), _SmallTransformer()
    return _classification_task(model, teacher, torch.randint(0, 32, (size, 8)))


_TASKS = {"mlp": _mlp_task, "cnn": _cnn_task, "transformer": _transformer_task}


def _train(model: nn.Module, x: Tensor, y: Tensor, losses: Callable, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(x.shape[0], generator=_generator(1))
    for step in range(steps):
        start = (step * _TRAIN_BATCH) % (x.shape[0] - _TRAIN_BATCH)
        rows = order[start : start + _TRAIN_BATCH]
        optimizer.zero_grad()
        losses(model, x[rows], y[rows]).mean().backward()
        optimizer.step()


def real_gramian(model_name: str, trained: bool) -> Tensor:
    """The ``1024 × 1024`` per-sample Gramian of ``model_name`` (float32), generated (a few
    seconds: training on 4096 samples, then the Gramian of the next 1024) or read from the
    cache."""
    from jdoptim.autogram import Engine

    path = _CACHE / f"{model_name}-{'trained' if trained else 'init'}.pt"
    if path.exists():
        return torch.load(path)
    model, x, y, losses = _TASKS[model_name](4096 + MAX_M, seed=0)
    if trained:
        _train(model, x[:4096], y[:4096], losses, TRAINED_STEPS)
    with Engine(model, batch_dim=0) as engine:
        gramian = engine.compute_gramian(losses(model, x[4096:], y[4096:])).detach()
    gramian = (0.5 * (gramian + gramian.T)).float().contiguous()
    _CACHE.mkdir(exist_ok=True)
    (_CACHE / ".gitignore").write_text("*\n")
    torch.save(gramian, path)
    return gramian


# --- synthetic members -------------------------------------------------------------------------


def _gram(jacobian: Tensor) -> Tensor:
    j = jacobian.double()
    return (j @ j.T).float()


def _random(m: int) -> Tensor:
    return _gram(torch.randn(m, 4096, generator=_generator(m)))


def _rank_deficient(m: int) -> Tensor:
    g = _generator(m)
    rank = max(1, m // 4)
    return _gram(torch.randn(m, rank, generator=g) @ torch.randn(rank, 4096, generator=g))


def _ill_conditioned(m: int) -> Tensor:
    g = _generator(m)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(2 * m, m, generator=g, dtype=torch.float64))[0]
    j = (u * torch.logspace(0, -6, m, dtype=torch.float64)) @ v.T
    return _gram(j)


def _duplicated(m: int) -> Tensor:
    g = _generator(m)
    half = torch.randn((m + 1) // 2, 4096, generator=g)
    rows = torch.cat([half, half])[:m]
    return _gram(rows[torch.randperm(m, generator=g)])


_SYNTHETIC: dict[str, Callable[[int], Tensor]] = {
    "random": _random,
    "rank_deficient": _rank_deficient,
    "ill_conditioned": _ill_conditioned,
    "duplicated": _duplicated,
}
REAL = [f"{model}-{state}" for model in _TASKS for state in ("init", "trained")]
FAMILIES = REAL + list(_SYNTHETIC)


def gramian(family: str, m: int) -> Tensor:
    """The float32 ``m × m`` Gramian of ``family`` (one of :data:`FAMILIES`), ``1 ≤ m ≤ 1024``."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"m must be in [1, {MAX_M}], got {m}.")
    if family in _SYNTHETIC:
        return _SYNTHETIC[family](m)
    if family not in REAL:
        raise ValueError(f"unknown Gramian family {family!r}; expected one of {FAMILIES}.")
    model_name, state = family.split("-")
    return real_gramian(model_name, state == "trained")[:m, :m].contiguous()
