r"""The engine's check of its own assumptions, and the exact routes it takes when they fail.

The fast paths rest on assumptions the engine cannot read off the model:

* **per-sample independence** (with ``batch_dim``): loss ``(i, k)`` depends on sample ``i`` of
  every hooked call's outputs only, so one backward pass with all-ones output weights gives, in
  its sample-``i`` slice, ``∂ℓ_{ik}/∂Y_i``. Losses that mix samples (a contrastive loss), a
  permuted loss vector (``losses.flip(0)``), an operation that mixes samples after a hooked call
  (``h - h.mean(0)``) or a call whose output is shared by the samples but happens to have ``b``
  rows (``wpe(arange(t))`` with ``t = b``) all break it, silently;
* **sample-major folding**: a call whose sample dimension holds ``k·b`` entries (``[b·s, d]``
  token rows, frames or windows folded into the batch) is read as ``k`` consecutive entries per
  sample (:attr:`.rules.Call.group`); rows folded another way (``[s·b, d]``) or a shared output
  with ``k·b`` rows break it;
* **faithful re-runs**: the generic rule re-runs a module's forward; one that depends on state it
  changes, or that cannot run under ``torch.func``, gives other rows. (A call that changed its
  module's buffers in place is not re-run at all: see :mod:`._records`. The check catches the
  rest, to its tolerance.)

**The check.** For a random ``v`` (a private generator: the user's random stream is untouched),
the engine's ``Jᵀv``, assembled from the same output gradients and rules as the step
(``Σᵢₖ v_{ik} rows_{ik}`` per parameter), is compared with autograd's ``∂(vᵀℓ)/∂θ`` on the
losses' own graph. If per-sample independence fails for some ``i ≠ j`` with
``∂ℓ_j/∂Y_i ≠ 0``, the two differ by ``Σᵢ Σ_{j≠i} (vᵢ - v_j) ∂ℓ_j/∂Y_i ∂Y_i/∂θ``, which is
non-zero for almost every ``v``; the same holds for any rule whose rows are wrong. Its cost is one
ordinary backward pass and one weighted update, on the first step of each graph *structure*
(the hooked calls, their output shapes, whether they drew random numbers or changed their
buffers, the losses' shape):
small next to the steps that follow.

**The routes**, tried in this order until the check passes, and then remembered for the
structure:

1. per-sample mode (one backward row per task);
2. per-sample mode with the failing re-run modules re-run on the whole batch instead of one
   sample at a time (an input of batch size that does not index the samples, such as a
   ``[b, b]`` attention mask, is then not sliced), their rows being the vector-Jacobian
   products with the output gradient of one sample each;
3. task mode: one backward row per loss (``b = 1``, ``T = m``), exact whatever the losses'
   dependence on the samples; taken at once when a hooked output does not index the samples
   (a position embedding of shape ``[t, d]`` or ``[1, s, d]`` not yet expanded along the
   batch: see :mod:`._shared`; a step that sees such a call unexpanded and makes it expandable
   takes this route without a warning, the next forwards being expanded, unless the call's
   consumers are additions, where that step reads it per sample);
4. task mode with the failing modules' parameters taking their rows straight from autograd.

Each change of route warns once, naming the modules by their path in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..linalg.torch_errors import OutOfMemoryError
from ._graph import GraphScan
from ._step import GramianStep
from .rules import GenericRule


class EngineRouteWarning(UserWarning):
    """The engine took a slower exact route for a step (see :mod:`jdoptim.autogram._certify`)."""


@dataclass(frozen=True)
class Route:
    per_sample: bool
    explicit: frozenset[int] = frozenset()  # ids of modules whose rows come from autograd
    whole: frozenset[int] = frozenset()  # ids of re-run modules re-run on the whole batch
    regions: bool = True  # read sample-shared regions per sample (see ._regions)
    #: the modules (ids) whose readings rested on index values on the checked step: a later
    #: step that reads otherwise is checked anew (:class:`._step.ReadingChanged`)
    by_values: frozenset[int] = frozenset()


def signature(scan: GraphScan, losses: Tensor, per_sample: bool, params: set[int]) -> tuple:
    """What the route depends on: the hooked calls, their outputs' shapes, whether they drew
    random numbers or changed their buffers, the step's parameters (ids in ``params``) used
    outside calls, and the losses' shape. (Other leaves, such as an input with
    ``requires_grad``, are new tensors at every step and must not make every step a new
    structure.)"""
    calls = tuple(
        (id(r.module), tuple(t.shape for t in r.tapped), r.rng is not None, bool(r.mutated))
        for r in scan.calls
    )
    outside = tuple(id(t) for t in scan.outside_leaves if id(t) in params)
    return (per_sample, tuple(losses.shape), calls, outside)


def routing_free(key: tuple, gathered: frozenset[int]) -> tuple:
    """A route's key (:func:`signature`) without the output shapes of the calls of the modules
    (ids) in ``gathered``, which work on entries gathered from the samples' (a mixture of
    experts' experts on their tokens): their sizes follow the routing, which each forward makes
    anew, where the calls, every other shape and the way each call is read stay those of the
    structure the engine checked. Their ranks stay in the key."""
    per_sample, losses_shape, calls, outside = key
    free = tuple(
        (module, tuple(len(s) for s in shapes) if module in gathered else shapes, rng, mutated)
        for module, shapes, rng, mutated in calls
    )
    return (per_sample, losses_shape, free, outside, gathered)


@dataclass
class Probe:
    """What the check compares with autograd, for a random ``v``: the step's own ``Jᵀv`` per
    parameter (``step.shared`` then ``step.specific``), the modules whose rules give each
    parameter's rows (by parameter id), the dtypes the step computed in, and the modules already
    known to fail, with why (a re-run that raised, an output computed from another)."""

    grads: list[Tensor]
    users: dict[int, list[nn.Module]]
    dtypes: set[torch.dtype]
    failed: dict[nn.Module, str]


def draw_probe_weights(losses: Tensor, generator: torch.Generator) -> Tensor:
    """The check's random ``v``, from the engine's private generator (the user's random stream
    is untouched)."""
    v = torch.randn(losses.shape, generator=generator, dtype=torch.float64)
    return v.to(dtype=losses.dtype, device=losses.device)


def held_probe(step: GramianStep, v: Tensor) -> Probe:
    """The probe of an ordinary step, from the output gradients it holds."""
    failed = dependent_outputs(step)
    users: dict[int, list[nn.Module]] = {}
    dtypes = {t.dtype for parts in step.rule_parameters for t in parts.rule.call.record.tapped}
    for parts in step.rule_parameters:
        for p in [*parts.shared, *parts.specific]:
            users.setdefault(id(p), []).append(parts.rule.call.module)
    try:
        with torch.no_grad():
            shared, specific = step.gradients(v, weigh_specific=True)
    except RuntimeError as err:  # a re-run that failed: GenericRule names its module
        if isinstance(err, OutOfMemoryError):
            raise
        module = _raising_module(step, v)
        if module is None:
            raise
        failed[module] = str(err).splitlines()[0]
        return Probe([], users, dtypes, failed)
    return Probe([*shared, *specific], users, dtypes, failed)


def tolerance(step: GramianStep, losses: Tensor, probe: Probe) -> float:
    """Tolerance of the check, relative to the largest parameter gradient: 1000 units in the last
    place of the least precise dtype the step computes in (``1.2e-4`` in float32), between
    ``1e-6`` and ``5e-2``. The floor of ``1e-6`` leaves room for the float32 parts of float64
    models (transformers' RMSNorm and T5 norm compute their variance in float32)."""
    dtypes = {losses.dtype, *(p.dtype for p in [*step.shared, *step.specific]), *probe.dtypes}
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    return min(5e-2, max(1e-6, 1000 * eps))


def failing_modules(
    step: GramianStep, losses: Tensor, v: Tensor, probe: Probe
) -> dict[nn.Module, str]:
    """The modules whose parameters' ``Jᵀv`` from the step (``probe``) differs from autograd's,
    with why (an empty dict when the step is exact). Keeps the losses' graph."""
    params = [*step.shared, *step.specific]
    with torch.enable_grad():
        expected = torch.autograd.grad(losses, params, v, retain_graph=True, allow_unused=True)
    failed = dict(probe.failed)
    if not probe.grads:  # a rule raised: the modules named are the failure
        return failed
    tol = tolerance(step, losses, probe)
    norms = [0.0 if e is None else e.double().norm().item() for e in expected]
    # Errors are measured against the largest gradient: a block whose gradient cancels to
    # nearly nothing (upstream of a LayerNorm under a scale-invariant loss) carries rounding
    # noise of the size of the others' rounding, on both sides.
    floor = max(norms, default=0.0)
    for p, actual, wanted, norm in zip(params, probe.grads, expected, norms):
        wanted = torch.zeros_like(p) if wanted is None else wanted
        error = (actual.double() - wanted.double()).norm().item()
        if error > tol * max(norm, actual.double().norm().item(), floor, 1e-30):
            for module in probe.users.get(id(p), []):
                failed.setdefault(module, f"relative difference {error / max(norm, 1e-30):.2g}")
    return failed


def dependent_outputs(step: GramianStep) -> dict[nn.Module, str]:
    """Re-run calls with an output computed from another of their outputs (a model returning
    its hidden states and the logits computed from them): the backward's gradient at the first
    already holds what flows through the second, so the generic rule's vector-Jacobian product
    over both counts that path twice; off by as little as that path's share of the gradient,
    which may be below the check's tolerance. Such modules take their rows from autograd. One
    walk of each such call's part of the graph, on the first step of a structure."""
    found: dict[nn.Module, str] = {}
    edges_of: dict[int, list] = {}
    for record, _, edge in step.call_edges:
        edges_of.setdefault(id(record), []).append(edge)
    for parts in step.rule_parameters:
        record = parts.rule.call.record
        if computes_one_output_from_another(parts.rule, edges_of.get(id(record), [])):
            found[record.module] = ONE_FROM_ANOTHER
    return found


#: why :func:`computes_one_output_from_another` fails a module
ONE_FROM_ANOTHER = "one of its outputs is computed from another of them"


def computes_one_output_from_another(rule: object, edges: list) -> bool:
    """Whether a re-run call (``rule`` generic) has a reached output computed from another of
    its reached outputs (``edges``); see :func:`dependent_outputs`."""
    if not isinstance(rule, GenericRule) or len(edges) < 2:
        return False
    record = rule.call.record
    if record.paths:  # its outputs are the additions it is read at, each from Y alone
        return False
    tapped = {(edge.node, edge.output_nr) for edge in edges}
    stop = {t.grad_fn for t in record.input_tensors() if t.grad_fn is not None}
    return _reaches_another(edges, tapped, stop)


def _reaches_another(edges: list, tapped: set, stop: set) -> bool:
    """Whether the graph below some tapped output's node reaches another tapped output."""
    for edge in edges:
        seen = {edge.node}
        stack = [edge.node]
        while stack:
            node = stack.pop()
            for child, nr in node.next_functions:
                if child is None or child in stop:
                    continue
                if (child, nr) in tapped:
                    return True
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
    return False


def _raising_module(step: GramianStep, v: Tensor) -> nn.Module | None:
    """The first call whose rule raises on the weighted update (a failing re-run)."""
    moved = step.moved(v)
    for parts in step.rule_parameters:
        try:
            with torch.no_grad():
                parts.rule.weighted([*parts.shared, *parts.specific], moved)
        except RuntimeError:
            return parts.rule.call.module
    return None
