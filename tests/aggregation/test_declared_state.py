"""Declared state (``jdoptim/aggregation/state.py``): the mechanism on toy modules, checkpoints
in the format written before the declarations (dicts built by hand), and ``reset()`` of every
stateful method against a fresh instance."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from jdoptim import scalarization as S
from jdoptim.aggregation import (
    DBMTL,
    IMTL,
    PCD,
    CRMOGMWeighting,
    ExcessMTL,
    GradDrop,
    GradNorm,
    GradVac,
    GramianWeightedAggregator,
    MGDAWeighting,
    MoCo,
    MoDo,
    NashMTL,
    PCGrad,
    Random,
    SDMGrad,
    UPGradWeighting,
)
from jdoptim.aggregation._inputs import InputAggregator, InputWeightedAggregator, MethodInputs
from jdoptim.aggregation.state import (
    CheckpointedState,
    DeclaredState,
    broadcast_state_dict,
    holds_state,
)

# -- the mechanism, on toy modules ---------------------------------------------------------------


class _Toy(CheckpointedState, nn.Module):
    """Counts calls, keeps the last input, a learned scale, a local tag and a warn-once flag."""

    def __init__(self) -> None:
        super().__init__()
        self.declare_state("_count", 0, convert=int)
        self.declare_state("_last", torch.zeros(2))
        self.declare_state("scale", nn.Parameter(torch.ones(2)))
        self.declare_state("_tag", "rank-own", sync="local")
        self.declare_state("_scratch", None, persistent=False)
        self.declare_warning("_warned")

    def forward(self, x: Tensor) -> Tensor:
        if not self._warned:
            self._warned = True
            warnings.warn("toy: warned once", RuntimeWarning, stacklevel=2)
        self._count += 1
        self._last = self._last + x
        self._scratch = x.clone()
        return self.scale * self._last


def _used_toy() -> _Toy:
    toy = _Toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        toy(torch.tensor([1.0, 2.0]))
        toy(torch.tensor([3.0, 4.0]))
    with torch.no_grad():
        toy.scale.mul_(3.0)
    toy._tag = "mine"
    return toy


def test_reset_restores_every_default_and_keeps_the_parameter_object() -> None:
    toy = _used_toy()
    parameter = toy.scale
    toy.reset()
    assert toy._count == 0 and toy._scratch is None and toy._warned is False
    assert torch.equal(toy._last, torch.zeros(2)) and toy._tag == "rank-own"
    assert toy.scale is parameter and torch.equal(parameter.detach(), torch.ones(2))
    toy._last.add_(5.0)  # the live value is a copy: the default is untouched
    toy.reset()
    assert torch.equal(toy._last, torch.zeros(2))


def test_a_warn_once_flag_warns_once_then_again_after_reset() -> None:
    toy = _Toy()
    with pytest.warns(RuntimeWarning, match="warned once"):
        toy(torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toy(torch.ones(2))  # no second warning
    toy.reset()
    with pytest.warns(RuntimeWarning, match="warned once"):
        toy(torch.ones(2))


def test_the_checkpoint_holds_exactly_the_persistent_state_as_copies() -> None:
    toy = _used_toy()
    state = toy.state_dict()
    assert set(state) == {"scale", "_extra_state"}  # the parameter through nn.Module
    extra = state["_extra_state"]
    assert set(extra) == {"count", "last", "tag"}  # no scratch, no warn-once flag
    assert extra["count"] == 2 and torch.equal(extra["last"], torch.tensor([4.0, 6.0]))
    extra["last"].add_(100.0)  # saved tensors are copies
    assert torch.equal(toy._last, torch.tensor([4.0, 6.0]))


def test_a_load_copies_converts_and_does_not_alias() -> None:
    source, target = _used_toy(), _Toy()
    state = source.state_dict()
    state["_extra_state"]["count"] = 7.0  # converted by the declaration
    target.load_state_dict(state)
    assert target._count == 7 and isinstance(target._count, int)
    assert torch.equal(target._last, source._last) and target._last is not source._last
    state["_extra_state"]["last"].add_(1.0)
    assert torch.equal(target._last, torch.tensor([4.0, 6.0]))
    assert torch.equal(target.scale.detach(), torch.full((2,), 3.0)) and target._tag == "mine"


def _toy_state(toy: _Toy) -> tuple[Any, ...]:
    return toy._count, toy._last.clone(), toy._tag, toy._scratch


def test_a_bad_checkpoint_is_refused_and_changes_nothing() -> None:
    toy = _used_toy()
    before = _toy_state(toy)
    with pytest.raises(ValueError, match=r"lacks \['count'\]"):
        toy.set_extra_state({"last": torch.ones(2), "tag": "x"})
    with pytest.raises(TypeError, match="'last' is a str"):
        toy.set_extra_state({"count": 1, "last": "oops", "tag": "x"})
    with pytest.raises(TypeError, match="'count' is a bool"):
        toy.set_extra_state({"count": True, "last": torch.ones(2), "tag": "x"})
    after = _toy_state(toy)
    assert before[0] == after[0] and torch.equal(before[1], after[1]) and before[2:] == after[2:]


def test_rank0_broadcast_leaves_local_state_out_and_a_load_keeps_it() -> None:
    rank0, other = _used_toy(), _Toy()
    other._tag = "other's own"
    state = broadcast_state_dict(rank0)
    assert set(state["_extra_state"]) == {"count", "last"}
    other.load_state_dict(state)
    assert other._count == 2 and other._tag == "other's own"


def test_declarations_are_checked() -> None:
    class Plain(DeclaredState, nn.Module):
        pass

    plain = Plain()
    with pytest.raises(TypeError, match="CheckpointedState"):
        plain.declare_state("_ema", None)
    plain.declare_state("_ema", None, persistent=False)
    with pytest.raises(ValueError, match="declared twice"):
        plain.declare_state("_ema", 0, persistent=False)
    with pytest.raises(ValueError, match="sync"):
        plain.declare_state("_x", 0, persistent=False, sync="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameter"):
        plain.declare_state("w", nn.Parameter(torch.ones(1)), sync="local")
    assert [spec.name for spec in plain.declared_state()] == ["_ema"]


def test_holds_state() -> None:
    assert holds_state(_Toy())
    assert holds_state(NashMTL()) and holds_state(S.UW(2))
    assert not holds_state(GramianWeightedAggregator(UPGradWeighting()))  # a warn-once flag only
    assert not holds_state(GramianWeightedAggregator(MGDAWeighting()))


# -- checkpoints written before the declarations (the same keys, built by hand) -----------------


def _t(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _generator_state(seed: int) -> Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def _same_stream(generator: torch.Generator, seed: int) -> bool:
    reference = torch.Generator().manual_seed(seed)
    return torch.equal(torch.rand(5, generator=generator), torch.rand(5, generator=reference))


def _adam_state() -> dict[str, Any]:
    """The state of an Adam that took one step on a parameter of shape (2,)."""
    parameter = nn.Parameter(torch.zeros(2))
    adam = torch.optim.Adam([parameter], lr=0.025, weight_decay=1e-3)
    parameter.grad = torch.tensor([0.5, -0.5])
    adam.step()
    return adam.state_dict()


def _dwa_lambdas(older: Tensor, newer: Tensor, temperature: float) -> Tensor:
    """DWA's ``λ_k = K exp(r_k / T) / Σ_j exp(r_j / T)``, ``r_k = L_k(t-1) / L_k(t-2)``."""
    ratios = newer / older
    return len(ratios) * torch.exp(ratios / temperature) / torch.exp(ratios / temperature).sum()


OLD_FORMAT: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable[[Any], bool]]] = {
    "excessmtl": (
        ExcessMTL,
        {"_extra_state": {"root_sums": _t(1, 2), "initial_risks": _t(3), "weights": _t(1)}},
        lambda m: torch.equal(m._root_sums, _t(1, 2)) and torch.equal(m._weights, _t(1)),
    ),
    "excessmtl_squared_sums": (
        ExcessMTL,
        {"_extra_state": {"squared_sums": _t(4, 9), "initial_risks": _t(3), "weights": _t(1)}},
        lambda m: torch.equal(m._root_sums, _t(2, 3)) and torch.equal(m._initial_risks, _t(3)),
    ),
    "nashmtl": (
        NashMTL,
        {"weighting._extra_state": {"step": 3, "weights": torch.tensor([0.5, 2.0])}},
        lambda m: m.weighting._step == 3 and m.weighting._weights.dtype == torch.float64,
    ),
    "gradvac": (
        lambda: GradVac(seed=0),
        {
            "weighting._extra_state": {
                "generator_state": _generator_state(5),
                "target_similarities": _t(0, 0.5, 0.5, 0),
            }
        },
        lambda m: (
            _same_stream(m.weighting._generator, 5)
            and torch.equal(m.weighting.target_similarities, _t(0, 0.5, 0.5, 0))
        ),
    ),
    "pcd": (
        PCD,
        {"weighting._extra_state": {"average": _t(1, 2), "steps": 4}},
        lambda m: m.weighting._steps == 4 and torch.equal(m.weighting._average, _t(1, 2)),
    ),
    "sdmgrad": (
        SDMGrad,
        {"weighting._extra_state": {"weights": _t(0.25, 0.75)}},
        lambda m: torch.equal(m.weighting._weights, _t(0.25, 0.75)),
    ),
    "modo": (
        MoDo,
        {"weighting._extra_state": {"weights": _t(0.25, 0.75)}},
        lambda m: torch.equal(m.weighting._weights, _t(0.25, 0.75)),
    ),
    "gradnorm": (
        GradNorm,
        {"weighting._extra_state": {"loss_weights": _t(1.5, 0.5), "initial_losses": _t(2, 3)}},
        lambda m: (
            torch.equal(m.weighting.loss_weights, _t(1.5, 0.5))
            and torch.equal(m.weighting.initial_losses, _t(2, 3))
        ),
    ),
    "dbmtl": (
        DBMTL,
        {"_extra_state": {"average": _t(1, 2), "steps": 2}},
        lambda m: m.steps == 2 and torch.equal(m.average, _t(1, 2)),
    ),
    "moco": (
        MoCo,
        {"_extra_state": {"tracked": _t(1, 2), "weights": _t(0.5, 0.5), "steps": 6}},
        lambda m: m.steps == 6 and torch.equal(m.tracked, _t(1, 2)),
    ),
    "imtl": (
        IMTL,
        {"weighting._extra_state": {"log_scales": _t(0.1, -0.1)}},
        lambda m: torch.equal(m.weighting.log_scales, _t(0.1, -0.1)),
    ),
    "pcgrad": (
        lambda: PCGrad(seed=0),
        {"weighting._extra_state": {"generator_state": _generator_state(7)}},
        lambda m: _same_stream(m.weighting._generator, 7),
    ),
    "random": (
        lambda: Random(seed=0),
        {"weighting._extra_state": {"generator_state": _generator_state(8)}},
        lambda m: _same_stream(m.weighting._generator, 8),
    ),
    "graddrop": (
        lambda: GradDrop(seed=0),
        {"_extra_state": {"generator_state": _generator_state(9)}},
        lambda m: _same_stream(m._generator, 9),
    ),
    "crmogm": (
        lambda: GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting())),
        {"weighting._extra_state": {"previous": _t(0.4, 0.6)}},
        lambda m: torch.equal(m.weighting._previous, _t(0.4, 0.6)),
    ),
    "dwa": (
        lambda: S.DWA(temperature=2.0),
        {"_extra_state": {"sum": _t(1, 1), "count": 1, "averages": [_t(2, 4), _t(1, 3)]}},
        lambda m: (
            m._count == 1
            and torch.allclose(
                m.current_weights(), _dwa_lambdas(_t(2, 4), _t(1, 3), 2.0), rtol=1e-12
            )
        ),
    ),
    "famo": (
        lambda: S.FAMO(2),
        {
            "logits": torch.tensor([0.1, -0.1]),
            "min_losses": torch.zeros(2),
            "_extra_state": {"adam": _adam_state(), "previous": torch.tensor([1.0, 2.0])},
        },
        lambda m: (
            torch.equal(
                m._optimizer.state[m.logits]["exp_avg"], _adam_state()["state"][0]["exp_avg"]
            )
            and m.pending_update
            and torch.equal(m.logits.detach(), torch.tensor([0.1, -0.1]))
        ),
    ),
    "stch": (
        lambda: S.STCH(0.5, warmup_steps=3),
        {"_extra_state": {"seen": 2, "running_min": _t(0.5, 0.25)}},
        lambda m: m._seen == 2 and torch.equal(m._running_min, _t(0.5, 0.25)),
    ),
    "random_scalarizer": (
        lambda: S.Random(seed=0),
        {"_extra_state": {"generator_state": _generator_state(4)}},
        lambda m: _same_stream(m._generator, 4),
    ),
    "uw": (
        lambda: S.UW(2),
        {"log_var": torch.tensor([0.3, 0.4])},
        lambda m: torch.equal(m.log_var.detach(), torch.tensor([0.3, 0.4])),
    ),
}


@pytest.mark.parametrize("name", sorted(OLD_FORMAT))
def test_a_checkpoint_in_the_old_format_loads(name: str) -> None:
    make, state, loaded = OLD_FORMAT[name]
    method = make()
    method.load_state_dict(state)
    assert loaded(method)
    assert set(method.state_dict()) == set(state)  # the same entries, written back


# -- reset() after some steps behaves as a fresh instance ----------------------------------------


def _inputs(seed: int, m: int = 3, n: int = 5) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Three steps of (Jacobian, positive losses, second batch's Jacobian), float64."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(m, n, generator=generator, dtype=torch.float64),
            torch.rand(m, generator=generator, dtype=torch.float64) + 0.5,
            torch.randn(m, n, generator=generator, dtype=torch.float64),
        )
        for _ in range(3)
    ]


def _aggregate(method: nn.Module, jacobian: Tensor, losses: Tensor, other: Tensor) -> Tensor:
    inputs = MethodInputs(gramian=jacobian @ jacobian.T, jacobian=jacobian, losses=losses,
                          cross=jacobian @ other.T)  # fmt: skip
    if isinstance(method, InputWeightedAggregator):
        return method.aggregate(inputs)
    if isinstance(method, InputAggregator):
        return method(inputs)
    return method(jacobian)


def _scalarize(method: nn.Module, values: Tensor, index: int) -> Tensor:
    values = values.float().requires_grad_()
    result = method(values)
    if isinstance(method, S.FAMO):
        method.update(values.detach() * 0.9)
    if isinstance(method, S.DWA) and index % 2 == 1:
        method.step()
    learned = method.learnable_parameters()
    if learned:  # one plain descent step on UW's / IMTL-L's log-scales
        gradients = torch.autograd.grad(result, learned)
        with torch.no_grad():
            for parameter, gradient in zip(learned, gradients):
                parameter.sub_(0.1 * gradient)
    return torch.cat([result.detach().reshape(1), *[p.detach() for p in learned]])


def _run(method: nn.Module, seed: int) -> list[Tensor]:
    outputs = []
    for index, (jacobian, losses, other) in enumerate(_inputs(seed)):
        if isinstance(method, S.Scalarizer):
            outputs.append(_scalarize(method, losses, index))
        else:
            outputs.append(_aggregate(method, jacobian, losses, other))
    return outputs


STATEFUL: dict[str, Callable[[], nn.Module]] = {
    "excessmtl": ExcessMTL,
    "nashmtl": lambda: NashMTL(update_weights_every=2),
    "gradvac": lambda: GradVac(beta=0.5, seed=1),
    "pcd": PCD,
    "sdmgrad": SDMGrad,
    "modo": MoDo,
    "gradnorm": GradNorm,
    "dbmtl": DBMTL,
    "moco": MoCo,
    "imtl": IMTL,
    "pcgrad": lambda: PCGrad(seed=2),
    "random": lambda: Random(seed=3),
    "graddrop": lambda: GradDrop(seed=4),
    "crmogm": lambda: GramianWeightedAggregator(CRMOGMWeighting(PCD().weighting, alpha=0.5)),
    "dwa": lambda: S.DWA(window=None),
    "famo": lambda: S.FAMO(3),
    "stch": lambda: S.STCH(0.5, warmup_steps=2),
    "uw": lambda: S.UW(3),
    "imtll": lambda: S.IMTLL(3),
    "random_scalarizer": lambda: S.Random(seed=5),
}


def _same(a: Any, b: Any) -> bool:
    """Exact equality of (nested) states: tensors by value, dicts and lists entry by entry."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_reset_after_some_steps_gives_what_a_fresh_instance_gives(name: str) -> None:
    make = STATEFUL[name]
    used = make()
    _run(used, seed=0)
    assert not _same(used.state_dict(), make().state_dict())  # the steps changed the state
    resettable = used if hasattr(used, "reset") else used.weighting  # the generic wrapper
    resettable.reset()
    assert _same(used.state_dict(), make().state_dict())
    again, fresh = _run(used, seed=1), _run(make(), seed=1)
    for after_reset, from_fresh in zip(again, fresh):
        assert torch.equal(after_reset, from_fresh)
