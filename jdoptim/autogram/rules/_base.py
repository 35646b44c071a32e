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

from torch import Tensor, nn

from ._call import Call


class LayerRule(ABC):
    """How to differentiate one call of a module type (see :mod:`._call` for the notation)."""

    def __init__(self, call: Call) -> None:
        self.call = call

    @classmethod
    def applies(cls, call: Call) -> bool:
        """Whether this call has the form the rule handles (else the generic rule is used)."""
        return True

    @abstractmethod
    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        """Rows ``∂ℓ_{ik}/∂p``, one ``[b, T, *p.shape]`` tensor per parameter."""

    def gramian(self, params: list[Tensor]) -> Tensor:
        """``Σ_p J_p J_pᵀ`` over ``params`` as ``[b, T, b, T]``; by default from the rows."""
        call = self.call
        total = None
        for rows in self.jacobians(params):
            flat = rows.reshape(call.b * call.T, -1)
            term = flat @ flat.T
            total = term if total is None else total + term
        assert total is not None
        return total.view(call.b, call.T, call.b, call.T)

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
