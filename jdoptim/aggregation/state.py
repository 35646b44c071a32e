r"""Declared state: a method names each piece of its state once; everything else follows.

A stateful method (an EMA, a step counter, cached weights, a random generator, a learned
log-variance, a warn-once flag) calls, in its ``__init__``, once per piece of state::

    self.declare_state("_weights", None)                        # checkpointed, synced from rank 0
    self.declare_state("_warned_slow", False, persistent=False, sync="local")   # a warn-once flag
    self.declare_state("log_var", nn.Parameter(torch.zeros(m)))  # a learned parameter

and from these declarations alone (the idea of torchmetrics' ``Metric.add_state``):

* **reset** — :meth:`DeclaredState.reset` puts every declared piece back to a copy of its
  default (a parameter in place, so an optimizer holding it keeps working), then resets every
  direct child that is stateful (an aggregator's weighting, a wrapped weighting). Warn-once
  flags are state too, so a reset method warns again.
* **checkpointing** — :class:`CheckpointedState` derives ``get_extra_state`` /
  ``set_extra_state`` (so ``state_dict()`` / ``load_state_dict()``) from the persistent
  declarations: the entry of attribute ``_weights`` is ``"weights"`` (the attribute's name
  without its leading underscores, unless ``key=`` says otherwise). Tensors are copied on the
  way out and on the way in, so a checkpoint never aliases the live state, and a load is all or
  nothing (every entry is read and converted before any attribute is assigned). Parameters are
  persisted by ``nn.Module`` itself and never appear in the extra state.
* **the optimizer's snapshot** — :class:`jdoptim.JDOptimizer` copies ``state_dict()`` before a
  step and loads it back when the step is refused; :func:`holds_state` says whether there is
  anything to copy.
* **cross-process synchronisation** — ``sync="rank0"`` (the default) state is broadcast from
  rank 0 to every process before the first distributed step; ``sync="local"`` state stays with
  each process (:func:`broadcast_state_dict` leaves it out, and a load that lacks it keeps the
  current value).

Design decisions, for the next engineer:

* Declarations are per instance (in ``__init__``), not class attributes, because defaults often
  depend on the arguments (a parameter's shape, a generator's initial state, a fresh Adam's
  settings). They are kept, in declaration order, in ``self.__dict__["_declared_state"]``.
* A piece of state may be a Python property: the generator's state (``_generator_state``,
  read with ``Generator.get_state`` and written with ``set_state``, so a user's generator keeps
  its identity) and FAMO's Adam state are declared that way, with no special case here.
* Two mixins rather than one: ``nn.Module.state_dict`` writes an ``_extra_state`` entry whenever
  the class overrides ``get_extra_state``; methods whose only state is a warn-once flag (UPGrad,
  MGDA, …) or a parameter (UW) use :class:`DeclaredState`, so their ``state_dict`` keys (and the
  checkpoints already written) are unchanged and the optimizer does not snapshot them.
  Declaring persistent non-parameter state on a plain :class:`DeclaredState` raises, so no state
  can silently be left out of a checkpoint.
* :class:`Stateful` (the public marker, "its output depends on past calls") lives here too and
  keeps ``reset`` abstract: a class that is Stateful but declares nothing must write its own
  ``reset``; the declared-state mixins, placed before it in the bases, provide it.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "CheckpointedState",
    "DeclaredState",
    "StateSpec",
    "Stateful",
    "Sync",
    "broadcast_state_dict",
    "holds_state",
]

Sync = Literal["rank0", "local"]
_SYNCS = ("rank0", "local")
_EXTRA = "_extra_state"


class Stateful(ABC):
    """A method whose output depends on past calls (EMAs, cached weights, random generators).

    Its state is declared (see :mod:`jdoptim.aggregation.state`) or lives in buffers or in
    ``get_extra_state``/``set_extra_state``, so that ``state_dict()``/``load_state_dict()``
    restore the exact trajectory; :meth:`reset` returns it to the state it had at construction.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget every past call: the next call behaves as the first after construction."""


@dataclass(frozen=True)
class StateSpec:
    """One declared piece of state.

    Attributes:
        name: the attribute holding it.
        default: its value at construction and after ``reset()`` (copied each time).
        persistent: whether it is saved in ``state_dict()`` (parameters: always).
        sync: ``"rank0"`` (broadcast from rank 0) or ``"local"`` (each process its own).
        key: its entry in the extra-state dict.
        convert: applied to a loaded entry (after the copy), e.g. ``int``; ``None``: as is.
        is_parameter: whether it is a registered ``nn.Parameter`` (``default`` then holds a
            copy of its initial value).
    """

    name: str
    default: Any
    persistent: bool
    sync: Sync
    key: str
    convert: Callable[[Any], Any] | None = None
    is_parameter: bool = False


def copy_state(value: Any) -> Any:
    """A copy sharing no tensor storage with ``value`` (tensors detached and cloned, containers
    rebuilt, anything else deep-copied)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: copy_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(copy_state(item) for item in value)
    return copy.deepcopy(value)


class DeclaredState:
    """Mixin for ``nn.Module`` methods: :meth:`declare_state` and the :meth:`reset` it gives."""

    def declare_state(
        self,
        name: str,
        default: Any,
        *,
        persistent: bool = True,
        sync: Sync = "rank0",
        key: str | None = None,
        convert: Callable[[Any], Any] | None = None,
    ) -> None:
        """Declare the attribute ``name`` as state, with value ``default`` from now on.

        A ``default`` that is an ``nn.Parameter`` is registered as a parameter (persisted by
        ``nn.Module``; reset in place to its initial value).
        """
        is_parameter = isinstance(default, nn.Parameter)
        key = key or name.lstrip("_")
        spec = StateSpec(name, copy_state(default), persistent, sync, key, convert, is_parameter)
        self._check_new_spec(spec)
        setattr(self, name, default if is_parameter else copy_state(default))
        self.__dict__.setdefault("_declared_state", {})[name] = spec

    def declare_warning(self, name: str) -> None:
        """Declare a warn-once flag: ``False`` until the warning is shown; not saved, not
        synchronised (each process warns for itself), cleared by ``reset()``."""
        self.declare_state(name, False, persistent=False, sync="local")

    def declared_state(self) -> tuple[StateSpec, ...]:
        """This module's declarations, in declaration order (its children's not included)."""
        return tuple(self.__dict__.get("_declared_state", {}).values())

    def reset(self) -> None:
        """Every declared piece of state back to its default, then every stateful direct child
        reset: the next call behaves as the first after construction."""
        for spec in self.declared_state():
            if spec.is_parameter:
                with torch.no_grad():
                    getattr(self, spec.name).copy_(spec.default)
            else:
                setattr(self, spec.name, copy_state(spec.default))
        assert isinstance(self, nn.Module), "DeclaredState is a mixin for nn.Module methods"
        for child in self.children():
            if isinstance(child, (DeclaredState, Stateful)):
                child.reset()

    def _check_new_spec(self, spec: StateSpec) -> None:
        owner = type(self).__name__
        if spec.sync not in _SYNCS:
            raise ValueError(f"{owner}: sync must be one of {_SYNCS}, got {spec.sync!r}.")
        known = self.declared_state()
        if any(spec.name == other.name or spec.key == other.key for other in known):
            raise ValueError(
                f"{owner}: the state {spec.name!r} (key {spec.key!r}) is declared twice."
            )
        if spec.is_parameter and not (spec.persistent and spec.sync == "rank0"):
            raise ValueError(
                f"{owner}: the parameter {spec.name!r} is saved and synchronised by nn.Module; "
                "declare it with persistent=True and sync='rank0'."
            )
        if spec.persistent and not spec.is_parameter and not isinstance(self, CheckpointedState):
            raise TypeError(
                f"{owner} declares the persistent state {spec.name!r} but does not save extra "
                "state: derive it from CheckpointedState (or declare it persistent=False)."
            )


class CheckpointedState(DeclaredState):
    """:class:`DeclaredState` whose persistent declarations are its ``get_extra_state``."""

    def _saved_specs(self) -> list[StateSpec]:
        return [s for s in self.declared_state() if s.persistent and not s.is_parameter]

    def get_extra_state(self) -> dict[str, Any]:
        return {spec.key: copy_state(getattr(self, spec.name)) for spec in self._saved_specs()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        specs = self._saved_specs()
        if not isinstance(state, dict):
            raise TypeError(
                f"{type(self).__name__}: its extra state is a dict, got {type(state).__name__}."
            )
        missing = [s.key for s in specs if s.key not in state and s.sync != "local"]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's state lacks {missing} (it has "
                f"{sorted(state)}): it was written by another method or version. Nothing was "
                "loaded."
            )
        given = [s for s in specs if s.key in state]
        for spec in given:
            _check_entry(type(self).__name__, spec, state[spec.key])
        values = {s.name: _loaded(s, state[s.key]) for s in given}
        values.update(self._derived_state(values))
        for name, value in values.items():
            setattr(self, name, value)

    def _derived_state(self, loaded: dict[str, Any]) -> dict[str, Any]:
        """Non-persistent state recomputed from the ``loaded`` values (by attribute name),
        before anything is assigned (so that it may still refuse the load). None by default."""
        return {}


def _expected_types(default: Any) -> tuple[tuple[type, ...], str]:
    """The types a checkpoint entry may have, from the declared default's type."""
    if default is None or isinstance(default, Tensor):
        return (Tensor, type(None)), "a tensor or None"
    if isinstance(default, bool):
        return (bool,), "a bool"
    if isinstance(default, (int, float)):
        return (int, float), "a number"
    if isinstance(default, (list, tuple, dict)):
        return (type(default),), f"a {type(default).__name__}"
    return (object,), "anything"


def _check_entry(owner: str, spec: StateSpec, entry: Any) -> None:
    types, expected = _expected_types(spec.default)
    if not isinstance(entry, types) or (types == (int, float) and isinstance(entry, bool)):
        raise TypeError(
            f"{owner}: the checkpoint's state entry {spec.key!r} is a {type(entry).__name__}, "
            f"but {expected} was expected: the checkpoint is corrupted or of another method. "
            "Nothing was loaded."
        )


def _loaded(spec: StateSpec, entry: Any) -> Any:
    value = copy_state(entry)
    if spec.convert is not None and value is not None:
        value = spec.convert(value)
    return value


def holds_state(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) may change state when called: a
    :class:`Stateful` method, declared persistent state, extra state, or buffers."""
    for sub in module.modules():
        if isinstance(sub, Stateful):
            return True
        if isinstance(sub, DeclaredState) and any(s.persistent for s in sub.declared_state()):
            return True
        if type(sub).get_extra_state is not nn.Module.get_extra_state:
            return True
        if next(sub.buffers(recurse=False), None) is not None:
            return True
    return False


def broadcast_state_dict(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` without its ``sync="local"`` entries: what rank 0 sends to the
    other processes (who load it with ``load_state_dict``; their local state is kept)."""
    state = module.state_dict()
    for prefix, sub in module.named_modules():
        if not isinstance(sub, CheckpointedState):
            continue
        local = {s.key for s in sub._saved_specs() if s.sync == "local"}
        key = f"{prefix}.{_EXTRA}" if prefix else _EXTRA
        if local and isinstance(state.get(key), dict):
            state[key] = {k: v for k, v in state[key].items() if k not in local}
    return state
