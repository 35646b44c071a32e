"""The interface of a layer rule, and the registry that maps module types to rules.

A rule is registered for module classes, or lazily for a class by its qualified name
(``"transformers.pytorch_utils.Conv1D"``), so that a rule for an optional dependency's layer
never imports that dependency: a module matches when a class of its MRO has that
``__module__ + "." + __qualname__``. A registered rule applies to a subclass only when the
subclass keeps the registered class's ``forward`` (a subclass that overrides it, or an instance
whose ``forward`` was replaced, computes something else, and goes through the generic rule unless
it has a rule of its own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from ._call import Call
from ._terms import GramianTerm, RowsTerm

#: The module class a rule is written for (``nn.Module`` for a rule of any module).
ModuleT = TypeVar("ModuleT", bound=nn.Module)


class LayerRule(ABC, Generic[ModuleT]):
    r"""How to differentiate one call of a module type (see :mod:`._call` for the notation).

    A rule gives, for any subset ``params`` of its module's parameters:

    * :meth:`jacobians`: the rows ``∂ℓ_{ik}/∂p`` (needed when a parameter is tied into other
      calls, whose rows are summed before the Gram matrix is taken);
    * :meth:`factorisation`: its Gramian contribution as typed terms
      (:class:`~._terms.KernelTerm`, :class:`~._terms.IndexTerm`, :class:`~._terms.RowsTerm`);
      by default the rows. The local Gramian (:meth:`gramian`) and the distributed factor
      exchange both use it;
    * :meth:`weighted`: ``Σ_{i,k} w_{ik} ∂ℓ_{ik}/∂p``, the update, from the same output
      gradients (no second backward).
    """

    #: Whether the rule handles calls whose samples are folded with another dimension
    #: (:attr:`~._call.Call.group` ``> 1``: ``b·k`` entries along the sample dimension, ``k``
    #: consecutive ones per sample). A rule that reads the sample dimension only through
    #: ``reshape(b, -1, …)`` of :meth:`~._call.Call.samples_first` /
    #: :meth:`~._call.Call.grad_samples_first` and weighs through
    #: :meth:`~._call.Call.weighted_grad` handles them; the others (the default) are not given
    #: such calls, which then take the generic rule.
    grouped_samples: ClassVar[bool] = False

    #: Whether the rule reads something from the autograd graph of its calls
    #: (:meth:`read_graph`), which the step then does before its backward pass.
    reads_graph: ClassVar[bool] = False

    def __init__(self, call: Call) -> None:
        self.call = call

    @property
    def module(self) -> ModuleT:
        """The called module, typed as the class the rule is written for."""
        return self.module_of(self.call)

    @classmethod
    def module_of(cls, call: Call) -> ModuleT:
        """``call.module`` typed as the class the rule is written for: a rule subclassing
        ``LayerRule[nn.Embedding]`` reads ``nn.Embedding``'s typed attributes.

        The registry only hands a rule the calls of modules of the classes it is registered
        for (or their subclasses that keep their ``forward``), which is what makes this sound;
        a rule registered by qualified class name is written for ``nn.Module``.
        """
        return cast(ModuleT, call.module)

    @classmethod
    def applies(cls, call: Call) -> bool:
        """Whether this call has the form the rule handles (else the generic rule is used)."""
        return True

    @classmethod
    def read_graph(cls, module: nn.Module, node: torch.autograd.graph.Node) -> object:
        """For a rule that sets :attr:`reads_graph`: what it takes from ``node`` (the autograd
        node of the call's first tapped output) while its saved tensors are still there, before
        the step's backward pass frees them; ``None`` when there is nothing to take. The step
        keeps it as the record's ``graph_read``, for the rule to use instead of recomputing.

        Return tensors detached: a saved output can come back with ``node`` itself as its
        ``grad_fn``, and the record lives in that node's metadata, so keeping it undetached
        would make a cycle through autograd's C++ objects that keeps every step's graph alive.
        A call made under saved-tensor hooks (activation checkpointing) is never read."""
        return None

    @staticmethod
    def differentiates_attributes(call: Call, *names: str) -> bool:
        """Whether every parameter the call differentiates is the module's attribute of one of
        ``names`` (``"weight"``, ``"bias"``): false for a parametrized module
        (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``, the older
        ``weight_norm``), whose ``weight`` is computed from other parameters in the forward, so
        that a rule written for ``weight`` would differentiate the wrong tensors; such calls
        take the generic rule, which re-runs the forward with the parametrization."""
        # (read from ``_parameters``, where a parametrized module has no ``weight``: its
        # computed weight is no parameter of the call either)
        registered = call.module._parameters
        owned = [t for name in names if (t := registered.get(name)) is not None]
        return all(any(p is t for t in owned) for p in call.params)

    @abstractmethod
    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        """Rows ``∂ℓ_{ik}/∂p``, one ``[b, T, *p.shape]`` tensor per parameter."""

    def add_jacobians(self, params: list[Tensor], into: list[Tensor]) -> None:
        """Add the rows ``∂ℓ_{ik}/∂p`` of ``params`` to ``into`` in place (one
        ``[b, T, *p.shape]`` tensor per parameter, possibly a non-contiguous view of the step's
        own matrix of rows): how the step sums a tied parameter's rows over its calls. By
        default :meth:`jacobians` added; a rule that can put its rows straight into ``into``
        (an embedding's lookup scatters its few rows) overrides it, and the step then forms the
        other calls' rows first."""
        for target, rows in zip(into, self.jacobians(params)):
            target.add_(rows.reshape(target.shape))

    def sliced_jacobians(self, param: Tensor, part: slice) -> Tensor | None:
        """The rows of ``param[part]`` alone (a slice of its first dimension: a vocabulary's
        rows), ``[b, T, n, *param.shape[1:]]``; ``None`` where the rule does not form them so
        (the default). A parameter tied into several calls whose rows exceed the step's
        budget has its Gramian summed over such slices when every one of its calls' rules
        forms them (:mod:`.._held_rows`): one slice's rows in memory, not ``b T`` copies of
        the table."""
        return None

    def add_sliced_jacobians(self, param: Tensor, part: slice, into: Tensor) -> bool:
        """:meth:`sliced_jacobians` added to ``into`` in place; ``False`` (nothing added) where
        the rule does not form them. By default formed, then added; an embedding's lookup
        scatters its few rows straight into ``into``."""
        rows = self.sliced_jacobians(param, part)
        if rows is None:
            return False
        into.add_(rows.reshape(into.shape))
        return True

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """The Gramian contribution over ``params`` as a sum of terms; by default one
        :class:`~._terms.RowsTerm` per parameter (its rows from :meth:`jacobians`)."""
        return [RowsTerm(rows) for rows in self.jacobians(params)]

    def forms_rows(self, params: list[Tensor]) -> bool:
        """Whether :meth:`gramian` over ``params`` is computed from their explicit rows (the
        step then takes :meth:`jacobians` instead and holds them for the update, see
        :mod:`jdoptim.autogram._held_rows`): always for the default :meth:`factorisation`,
        else when every term of the factorisation is (:meth:`~._terms.GramianTerm.forms_rows`).
        A rule that overrides :meth:`factorisation` with a costly one should override this
        too."""
        if type(self).factorisation is LayerRule.factorisation:
            return True
        return all(term.forms_rows() for term in self.factorisation(params))

    @property
    def sparse_gradients(self) -> bool:
        """Whether :meth:`weighted` gives sparse gradients (a sparse lookup table's), which
        an update from the explicit rows would make dense."""
        return False

    def gramian(self, params: list[Tensor]) -> Tensor:
        """``Σ_p J_p J_pᵀ`` over ``params`` as ``[b, T, b, T]``: the sum of the
        :meth:`factorisation`'s terms. (Override :meth:`factorisation`, not this, so that the
        distributed engine exchanges the same description.)"""
        total: Tensor | None = None
        for term in self.factorisation(params):
            part = term.gramian()
            total = part if total is None else total + part
        if total is None:
            call = self.call
            return torch.zeros(call.b, call.T, call.b, call.T, device=call.record.tapped[0].device)
        return total

    @abstractmethod
    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        """``Σ_{i,k} w_{ik} ∂ℓ_{ik}/∂p`` for each parameter (``weights`` is ``[b, T]``)."""


_RULES: dict[type[nn.Module], type[LayerRule]] = {}
_NAMED_RULES: dict[str, type[LayerRule]] = {}
_CACHE: dict[type[nn.Module], tuple[type[LayerRule], type[nn.Module]] | None] = {}


def qualified_name(kind: type) -> str:
    """``module.qualname`` of a class, the key of lazily registered rules."""
    return f"{kind.__module__}.{kind.__qualname__}"


def register_rule(
    *module_types: type[nn.Module] | str,
) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: use the rule for these module types, given as classes or as qualified
    class names (``"package.module.ClassName"``, matched without importing the package).

    A later registration for the same type replaces the earlier one. Example::

        @register_rule("mypackage.layers.ScaledLinear")
        class ScaledLinearRule(LinearLikeRule):
            ...
    """
    for module_type in module_types:
        if not isinstance(module_type, (type, str)):
            raise TypeError(
                "register_rule takes module classes or qualified class names "
                f"('package.module.ClassName'), got {module_type!r}."
            )

    def decorate(rule: type[LayerRule]) -> type[LayerRule]:
        if not (isinstance(rule, type) and issubclass(rule, LayerRule)):
            raise TypeError(f"register_rule decorates LayerRule subclasses, got {rule!r}.")
        for module_type in module_types:
            if isinstance(module_type, str):
                _NAMED_RULES[module_type] = rule
            else:
                _RULES[module_type] = rule
        _CACHE.clear()
        return rule

    return decorate


def _lookup(kind: type[nn.Module]) -> tuple[type[LayerRule], type[nn.Module]] | None:
    """The rule of the nearest class in ``kind``'s MRO that has one, with that class."""
    if kind not in _CACHE:
        found = None
        for base in kind.__mro__:
            rule = _RULES.get(base) or _NAMED_RULES.get(qualified_name(base))
            if rule is not None:
                found = (rule, base)
                break
        _CACHE[kind] = found
    return _CACHE[kind]


def registered_rule(module: nn.Module) -> type[LayerRule] | None:
    """The rule registered for ``module``'s type, if its ``forward`` is the registered type's
    (neither overridden by a subclass nor replaced on the instance)."""
    if "forward" in module.__dict__:
        return None
    kind = type(module)
    found = _lookup(kind)
    if found is None:
        return None
    rule, base = found
    return rule if kind.forward is base.forward else None
