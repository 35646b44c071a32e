"""Which modules the engine hooks, and which models it refuses.

* The given modules must be disjoint: none may be a submodule of another.
* Recursive hooking: a module with a direct trainable parameter is hooked, and differentiated
  with respect to all its parameters (``recurse=True``); its children are not hooked, unless it
  is a *split parent* (:func:`is_split_parent`: children with trainable parameters, no rule,
  no parametrization), whose children are hooked too: a per-sample step then reads its direct
  parameters where the batch meets them (:mod:`._regions`) and its children by their rules,
  and takes its call whole only where no region entry reads them, and in task mode
  (:meth:`._step.GramianStep._scanned`). A module without direct parameters is descended
  into. A parametrized module (``torch.nn.utils.parametrize``: ``weight_norm``,
  ``spectral_norm``, ``orthogonal``, …) counts its parametrizations' parameters as its own:
  hooked whole, its call is the layer's (``[b, …]`` outputs), where its parametrization
  list alone would be a call that returns the weight, shared by every sample.
* With ``batch_dim``, a module that mixes samples would make per-sample losses depend on other
  samples, and the per-sample Gramian would be wrong; such modules are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .rules import registered_rule


def check_disjoint(modules: Sequence[nn.Module]) -> None:
    for i, outer in enumerate(modules):
        inner_ids = {id(m): name for name, m in outer.named_modules()}
        for j, other in enumerate(modules):
            if i != j and id(other) in inner_ids:
                where = inner_ids[id(other)] or "itself"
                raise ValueError(
                    f"The modules given to the engine overlap: module #{j} "
                    f"({type(other).__name__}) is {where!r} inside module #{i} "
                    f"({type(outer).__name__}). Give disjoint modules (e.g. only the parent): "
                    "a parent's parameters already include its children's."
                )


def hooked_modules(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The parent-most modules with a direct trainable parameter, in order, each once; and
    within a split parent (:func:`is_split_parent`), the same for its children."""
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        direct = list(module.parameters(recurse=False))
        parametrizations = getattr(module, "parametrizations", None)
        if parametrize.is_parametrized(module) and isinstance(parametrizations, nn.Module):
            direct += list(parametrizations.parameters())
        if any(p.requires_grad for p in direct):
            found.append(module)
            if not is_split_parent(module):
                return
        for child in module.children():
            visit(child)

    for module in modules:
        visit(module)
    return found


def is_split_parent(module: nn.Module) -> bool:
    """Whether a module with direct trainable parameters is hooked *and* descended into: one
    with children that have trainable parameters, no registered rule and no parametrization
    (a ViT with its own ``cls_token`` and ``pos_embed`` around its blocks, a block with a
    layer-scale ``gamma``). Its children's calls take their rules, and its direct parameters
    are read where the batch meets them (:mod:`._regions`); where they cannot be, the step
    takes the parent's call whole, as for any module with direct parameters
    (:mod:`._graph`). The engine reads this once, when it places its hooks."""
    return (
        any(p.requires_grad for p in module.parameters(recurse=False))
        and registered_rule(module) is None
        and not parametrize.is_parametrized(module)
        and any(p.requires_grad for c in module.children() for p in c.parameters())
    )


def _named(modules: Sequence[nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    """``(label, module)`` for every submodule (see :func:`module_labels`)."""
    labels = module_labels(modules)
    for module in modules:
        for _, sub in module.named_modules():
            yield labels[id(sub)], sub


def module_labels(modules: Sequence[nn.Module]) -> dict[int, str]:
    """How messages name each submodule: its path in the model and its type, e.g.
    ``'transformer.h.0.attn' (GPT2Attention)``. With one module given (``modules=model``) the path
    is the model's own (``named_modules``); with several, ``modules[i].path``. The first path
    found names a module reached under several names."""
    labels: dict[int, str] = {}
    for index, module in enumerate(modules):
        for name, sub in module.named_modules():
            if id(sub) in labels:
                continue
            path = name
            if len(modules) > 1:
                path = f"modules[{index}]" + (f".{name}" if name else "")
            kind = type(sub).__name__
            labels[id(sub)] = f"'{path}' ({kind})" if path else f"the model itself ({kind})"
    return labels


def parameter_labels(modules: Sequence[nn.Module]) -> dict[int, str]:
    """How messages name each parameter: its path in the model (``'h.0.attn.c_attn.weight'``), as
    :func:`module_labels` names the modules."""
    labels: dict[int, str] = {}
    for index, module in enumerate(modules):
        prefix = f"modules[{index}]." if len(modules) > 1 else ""
        for name, param in module.named_parameters():
            labels.setdefault(id(param), f"'{prefix}{name}'")
    return labels


def batch_norms(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The batch-norm layers among the modules (their mode can change after construction)."""
    return [m for _, m in _named(modules) if isinstance(m, _BatchNorm)]


def sample_mixing_problem(modules: Sequence[nn.Module], batch_dim: int) -> str | None:
    """A message naming the first module that mixes the samples along ``batch_dim``, if any."""
    for name, module in _named(modules):
        if isinstance(module, _BatchNorm) and (module.training or not module.track_running_stats):
            return (
                f"{name} normalises with the statistics of the whole "
                "batch, so each per-sample loss depends on every sample and the per-sample "
                "Gramian would be wrong. Fix: replace it by GroupNorm/LayerNorm, put it in eval "
                "mode with running statistics (module.eval()), or use batch_dim=None."
            )
    return None
