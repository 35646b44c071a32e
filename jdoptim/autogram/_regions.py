r"""Sample-shared regions: what the samples share, read per sample where the batch enters it.

In per-sample mode one backward pass gives each sample's gradient at a hooked call's output
because the output indexes the samples. A tensor ``S`` computed from parameters alone does not:
DeBERTa's relative position embeddings (``LayerNorm(rel_embeddings.weight)``, a parameter read
directly by the encoder, then each layer's query and key projections of it) are the same for
every sample, so the backward gives only ``Σᵢ ∂ℓᵢ/∂S``, and the engine used to take such a
structure with one backward row per loss (``b`` times the backward passes).

Such a tensor meets the batch at an *entry* (:class:`Entry`), of three kinds:

* an *expansion along the batch* (:class:`Expansion`): ``S.expand(…)`` from size 1 (or from a
  new leading dimension) to ``b·k`` along ``batch_dim``, or ``S.repeat(…)`` by ``b·c`` along it
  and by 1 elsewhere (DeBERTa's ``[heads, 2k, d_h]`` repeated to ``[b·heads, 2k, d_h]``, the
  samples folded with the heads, sample-major; a broadcasting ``matmul`` expands its
  ``[1, heads, …]`` operand the same way). Sample ``i``'s losses read only its own entries of
  the expansion, so the backward's gradient ``D`` at the expansion's output holds, in those
  entries, ``∂ℓᵢ/∂(copy of S)``; summed over the copies that sample owns, it is sample ``i``'s
  gradient of ``S``:

  .. math:: \frac{\partial \ell_i}{\partial S} = \sum_{j \in \text{copies}(i)} D_j ;

* a *product* (:class:`Contraction`) ``A S`` (``mm``, ``addmm``), ``A`` the samples' rows
  (``F.linear(h, W)`` over ``[b, s, d]`` activations folds them to ``[b·s, d]``, sample-major)
  and ``S`` a parameter read outside every call (a head tied to the token embedding by reading
  its weight in the forward, class prototypes) or the output of a call that does not index the
  samples (class embeddings computed by hooked layers from fixed features): sample ``i``'s
  gradient of ``S`` is ``Σ_{r ∈ rows(i)} A_rᵀ D_r``;
* an *element-wise sum, difference or product* (:class:`Broadcast`) of a parameter read
  outside every call (through shape operations) with the batched activations, broadcasting it
  along the batch (``tokens + pos_embed``, ``gamma * h``, DeBERTa's ``q + q_bias``: the
  direct parameters of split parents, :func:`._selection.is_split_parent`): an expansion whose
  output gradient is first multiplied by ``∂out/∂S`` (``±alpha``, or the other operand),

  .. math:: \frac{\partial \ell_i}{\partial S} = \sum_{\text{broadcast}}
     \Big(D \odot \frac{\partial\, \text{out}}{\partial S}\Big)_i .

The *region* is the part of the graph above the entries' shared inputs. When the losses reach it
only through entries (nothing else of the step's graph reaches into it), a second backward,
from those inputs with each (task, sample)'s gradient of ``S`` as a row of its own
(``is_grads_batched``: ``T·b`` rows), gives each sample's gradient at the region's hooked calls'
outputs and at its parameters read directly. The region is parameter-sized (no activation of
``b`` samples flows through it), so these rows cost about ``T·b`` backward passes of a small
graph, not of the model. The region's calls are then recorded as calls expanded along the batch
(:mod:`._shared`: their inputs expanded as views, so that every rule sees ``b`` samples whose
``i``-th output gradient is sample ``i``'s), and its parameters read directly get rows
``[b, T, *p.shape]`` straight from that backward, taken as one more call's rule
(:class:`RegionRows`): a parameter that a module's call uses too (the tied table, which the
embedding's call looks up) has its rows summed over both, as any tied parameter's.

Whether a node is an entry is read off its shapes, so a size coincidence (a batched
``x.repeat(2, 1)`` at ``b = 2``) could make one look like an expansion; the engine's check on the
first step of each structure compares the step's ``Jᵀv`` with autograd's and then takes the
structure without regions (:class:`SampleSharedRegion` names a failure of the rows of the
parameters read directly).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from ..linalg.vmap_fallback import VmapState, batched_vjp
from ._graph import GraphScan, scan_graph
from ._records import CallRecord
from ._shared import expand_inputs
from .rules import Call, LayerRule

_EXPANSIONS = frozenset({"ExpandBackward0", "RepeatBackward0"})


class SampleSharedRegion(nn.Module):
    """What the engine's check names when the rows of parameters read directly in a
    sample-shared region (no module's rule gives them) differ from autograd's."""


#: the one instance the check reports
REGION = SampleSharedRegion()


class RegionRows(LayerRule):
    """The rows ``[b, T, *p.shape]`` of the parameters read directly in sample-shared regions,
    from the regions' backward, as a rule (so a parameter that a module's call uses too has its
    rows summed over both, as any tied parameter's)."""

    def __init__(self, call: Call, rows: list[Tensor]) -> None:
        super().__init__(call)
        self.rows = {id(p): r for p, r in zip(call.params, rows)}

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        return [self.rows[id(p)] for p in params]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        return [torch.tensordot(weights.to(r.dtype), r, dims=2) for r in self.jacobians(params)]


@dataclass(frozen=True, eq=False)
class Entry:
    """A node of the graph where a tensor ``S`` shared by the samples meets the batch.

    Attributes:
        node: the entry's node; the backward reads the gradient at its output.
        source: the edge of ``S`` (``node``'s input ``index``).
        index: which of ``node``'s inputs is ``S`` (the walk of the batched part stops there).
        shape: ``S``'s shape.
    """

    node: Node
    source: GradientEdge
    index: int
    shape: torch.Size

    @property
    def at(self) -> GradientEdge:
        """The edge of the entry's output, where the step's backward reads its gradient."""
        return GradientEdge(self.node, 0)

    def per_sample(self, grad: Tensor, b: int, batch_dim: int, stacked: bool) -> Tensor:
        """Each (task, sample)'s gradient of ``S``, ``[T·b, *S.shape]`` (task-major), from the
        backward's gradient at the output (``[T, *output shape]`` when ``stacked``)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Expansion(Entry):
    """``S`` expanded or repeated along the batch: ``out_shape`` has ``b·copies·n`` entries
    along ``batch_dim`` where ``S`` (``padded``: its shape left-padded with ones to the
    output's rank) has ``n``; sample ``i``'s ``copies`` copies are its, sample-major, and are
    summed, as are the dimensions ``expand`` broadcast."""

    padded: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    copies: int = 1

    def per_sample(self, grad: Tensor, b: int, batch_dim: int, stacked: bool) -> Tensor:
        g = grad if stacked else grad.unsqueeze(0)
        t, n = g.shape[0], self.padded[batch_dim]
        g = g.unflatten(batch_dim + 1, (b, self.copies, n)).sum(batch_dim + 2)
        g = g.movedim(batch_dim + 1, 1)  # [T, b, *out_shape with n along batch_dim]
        broadcast = [
            2 + d
            for d, (o, s) in enumerate(zip(self.out_shape, self.padded))
            if d != batch_dim and s == 1 and o != 1
        ]
        if broadcast:
            g = g.sum(broadcast, keepdim=True)
        return g.reshape(t * b, *self.shape)


@dataclass(frozen=True, eq=False)
class Broadcast(Expansion):
    """``S`` broadcast along the batch by an element-wise sum, difference or product with a
    batched operand (``tokens + pos_embed``, ``gamma * h``, ``h + bias``): as an expansion, after
    the gradient at the output is multiplied by ``∂out/∂S`` (``factor``: ``±alpha`` for a sum or
    difference, the other operand for a product, as the node saved it)."""

    factor: Tensor | float = 1.0

    def per_sample(self, grad: Tensor, b: int, batch_dim: int, stacked: bool) -> Tensor:
        factor = self.factor
        scaled = grad * (factor.to(grad.dtype) if isinstance(factor, Tensor) else factor)
        return super().per_sample(scaled, b, batch_dim, stacked)


@dataclass(frozen=True, eq=False)
class Contraction(Entry):
    r"""A product ``A S`` (``mm``, ``addmm``: ``F.linear(h, W)`` over ``[b, s, d]`` activations,
    folded to ``[b·s, d]`` rows) whose left operand ``A`` holds the samples' rows,
    sample-major, and whose right operand is ``S``: sample ``i``'s gradient of ``S`` is
    :math:`\sum_{r \in \text{rows}(i)} A_r^\top D_r` (``rows``: ``A`` as the node saved it)."""

    rows: Tensor | None = None

    def per_sample(self, grad: Tensor, b: int, batch_dim: int, stacked: bool) -> Tensor:
        assert self.rows is not None
        g = grad if stacked else grad.unsqueeze(0)
        t = g.shape[0]
        a = self.rows.reshape(b, -1, self.rows.shape[-1]).to(g.dtype)  # [b, g, k]
        per = torch.einsum("bgk,tbgn->tbkn", a, g.reshape(t, b, -1, g.shape[-1]))
        return per.reshape(t * b, *self.shape)


def _sizes(node: Node, name: str = "_saved_self_sym_sizes") -> tuple[int, ...] | None:
    sizes = getattr(node, name, None)
    return None if sizes is None else tuple(int(s) for s in sizes)


def expansion(node: Node, b: int, batch_dim: int) -> Expansion | None:
    """``node`` as an :class:`Expansion` along the batch of ``b`` samples, else ``None``."""
    name = type(node).__name__
    if name not in _EXPANSIONS or len(node.next_functions) != 1:
        return None
    child, nr = node.next_functions[0]
    shape = _sizes(node)
    if child is None or shape is None or not node._input_metadata:
        return None
    out = tuple(node._input_metadata[0].shape)
    if len(out) <= batch_dim or len(shape) > len(out) or out[batch_dim] % b:
        return None
    padded = (1,) * (len(out) - len(shape)) + shape
    if name == "ExpandBackward0":
        if padded[batch_dim] != 1 or out[batch_dim] == 1:
            return None
        copies = out[batch_dim] // b
    else:  # repeated b·c times along batch_dim, once along every other dimension
        if any(o != s for d, (o, s) in enumerate(zip(out, padded)) if d != batch_dim):
            return None
        per = out[batch_dim] // b
        if per % padded[batch_dim]:
            return None
        copies = per // padded[batch_dim]
    source = GradientEdge(child, nr)
    return Expansion(node, source, 0, torch.Size(shape), padded, out, copies)


#: ``(index of the right operand, the saved left operand)`` of the products read as contractions
_PRODUCTS = {"MmBackward0": (1, "_saved_self"), "AddmmBackward0": (2, "_saved_mat1")}
#: single-input operations between a shared parameter and a product's right operand
_SHAPE_OPS = frozenset(
    {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "CloneBackward0",
     "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1"}
)  # fmt: skip


def _from_shared(node: Node, shared: set[int], calls: bool = True) -> bool:
    """Whether ``node`` gives, through shape operations only, one of the ``shared`` tensors
    or (``calls``) nodes (ids)."""
    below: Node | None = node
    while below is not None and type(below).__name__ in _SHAPE_OPS:
        below = below.next_functions[0][0] if len(below.next_functions) == 1 else None
    variable = getattr(below, "variable", None)
    return below is not None and (id(variable) in shared or (calls and id(below) in shared))


#: element-wise operations read as :class:`Broadcast` entries, by node name: the saved operand
#: that is ``∂out/∂S`` for ``S`` as first or second operand (``None``: a sum or difference)
_BROADCASTS: dict[str, tuple[str, str] | None] = {
    "AddBackward0": None,
    "SubBackward0": None,
    "MulBackward0": ("_saved_other", "_saved_self"),
}


def broadcast(node: Node, b: int, batch_dim: int, shared: set[int]) -> Broadcast | None:
    """``node`` as a :class:`Broadcast` of one of the ``shared`` parameters (read outside every
    call; through shape operations only) along the batch of ``b`` samples, else ``None``."""
    name = type(node).__name__
    if name not in _BROADCASTS or len(node.next_functions) != 2 or not node._input_metadata:
        return None
    out = tuple(node._input_metadata[0].shape)
    if len(out) <= batch_dim or out[batch_dim] % b or out[batch_dim] < 2:
        return None
    for index, (child, nr) in enumerate(node.next_functions):
        if child is None or not child._input_metadata:
            continue
        shape = tuple(child._input_metadata[nr].shape)
        padded = (1,) * (len(out) - len(shape)) + shape
        if len(shape) > len(out) or padded[batch_dim] != 1:
            continue
        if not _from_shared(child, shared, calls=False):  # (a parameter: a shared call's output
            continue  # that meets the batch this way is expanded, or read at its additions)
        saved = _BROADCASTS[name]
        factor: Tensor | float
        if saved is None:
            alpha = float(getattr(node, "_saved_alpha", 1))
            factor = -alpha if name == "SubBackward0" and index == 1 else (alpha if index else 1.0)
        else:
            try:
                factor = getattr(node, saved[index])
            except RuntimeError:  # (freed)
                return None
        source = GradientEdge(child, nr)
        copies = out[batch_dim] // b
        return Broadcast(node, source, index, torch.Size(shape), padded, out, copies, factor)
    return None


def contraction(node: Node, b: int, batch_dim: int, shared: set[int]) -> Contraction | None:
    """``node`` as a :class:`Contraction` whose right operand is, through shape operations
    only, one of the ``shared`` tensors or nodes (ids: parameters read outside every call,
    outputs of calls that do not index the samples), else ``None``."""
    product = _PRODUCTS.get(type(node).__name__)
    if product is None or batch_dim != 0 or getattr(node, "_saved_alpha", 1) != 1:
        return None
    index, saved = product
    child, nr = node.next_functions[index]
    if child is None or not _from_shared(child, shared):
        return None
    try:
        rows = getattr(node, saved)
    except RuntimeError:  # (freed)
        return None
    shape = _sizes(node, "_saved_mat2_sym_sizes")
    if rows.dim() != 2 or rows.shape[0] % b or shape is None:
        return None
    return Contraction(node, GradientEdge(child, nr), index, torch.Size(shape), rows)


@dataclass(eq=False)
class Regions:
    """The sample-shared regions of a step (see the module docstring).

    Attributes:
        entries: where the batch meets them.
        records: the engine's records of the region's calls, by id, each with its copy
            recorded as expanded along the batch.
        leaves: the tensors the region reads directly (its parameters among them).
    """

    entries: list[Entry]
    records: dict[int, CallRecord]
    leaves: list[Tensor]

    @property
    def record_ids(self) -> set[int]:
        """The ids of the region's calls as the step records them (expanded along the batch)."""
        return {id(r) for r in self.records.values()}

    def failed(self, modules: Collection[nn.Module]) -> bool:
        """Whether the engine's check failed a region's call or its parameters read directly
        (:data:`REGION`) among ``modules``; another module's failure is not the regions'."""
        inside = {id(REGION), *(id(r.module) for r in self.records.values())}
        return any(id(m) in inside for m in modules)


def _keys(calls: dict[CallRecord, list]) -> set[int]:
    """Calls by their arguments' tuple: a record's copies (:func:`._shared.tap_additions`'s)
    keep it."""
    return {id(record.args) for record in calls}


def find_regions(
    roots: list[Node], key: str, scan: GraphScan, b: int, batch_dim: int, shared: set[int]
) -> Regions | None:
    """The regions of the step whose losses' graph starts at ``roots`` and whose calls ``scan``
    found, when the losses reach them only through entries (expansions along the batch, and
    products whose right operand is one of the ``shared`` tensors, by id) and each of their
    calls can be recorded as expanded along the batch; else ``None``. Two walks of the graph."""
    found: dict[Node, Entry] = {}

    def stop(node: Node) -> tuple[int, ...]:
        entry: Entry | None = (
            expansion(node, b, batch_dim)
            or contraction(node, b, batch_dim, shared)
            or broadcast(node, b, batch_dim, shared)
        )
        if entry is None:
            return ()
        found[node] = entry
        return (entry.index,)

    main = scan_graph(roots, key, stop=stop)
    if not found:
        return None
    sources = list(dict.fromkeys(e.source.node for e in found.values()))
    region = scan_graph(sources, key)
    main_keys, region_keys = _keys(main.calls), _keys(region.calls)
    main_leaves = {id(t) for t in main.outside_leaves}
    if main_keys & region_keys or main_leaves & {id(t) for t in region.outside_leaves}:
        return None
    records: dict[int, CallRecord] = {}
    for record in scan.calls:
        if id(record.args) in region_keys:
            expanded = _as_expanded(record, b, batch_dim)
            if expanded is None:
                return None
            records[id(record)] = expanded
        elif id(record.args) not in main_keys:
            return None
    return Regions(list(found.values()), records, region.outside_leaves)


def _as_expanded(record: CallRecord, b: int, batch_dim: int) -> CallRecord | None:
    """The region's call recorded as expanded along the batch (its inputs expanded as views, its
    outputs' shapes with ``b`` samples), or ``None`` if its outputs have no place for them."""
    if record.expanded or record.paths or record.nested:
        return None
    shapes = [t.shape for t in record.tapped]
    if all(len(s) > batch_dim and s[batch_dim] == 1 for s in shapes):
        new = False
    elif batch_dim == 0:
        new = True
    else:
        return None
    args, kwargs, complete = expand_inputs(record.args, record.kwargs, batch_dim, b, new)
    tapped = [t._replace(shape=_with_samples(t.shape, b, batch_dim, new)) for t in record.tapped]
    return replace(
        record,
        args=args,
        kwargs=kwargs,
        tapped=tapped,
        expanded=True,
        unexpanded=(record.args, record.kwargs, record.tapped[0].shape, batch_dim),
        inputs_expanded=complete,
        graph_read=None,
        saved_packed=True,
    )


def _with_samples(shape: torch.Size, b: int, batch_dim: int, new: bool) -> torch.Size:
    if new:
        return torch.Size((b, *shape))
    grown = list(shape)
    grown[batch_dim] = b
    return torch.Size(grown)


def to_call_gradient(grad: Tensor, t: int, batch_dim: int, stacked: bool, new: bool) -> Tensor:
    """A region call's output gradient ``[T·b, *Y.shape]`` (per (task, sample)) as a call
    expanded along the batch takes it: ``[T, *expanded shape]`` (no ``T`` unless ``stacked``)."""
    g = grad.unflatten(0, (t, -1))  # [T, b, *Y]
    if not new:
        g = g.squeeze(2 + batch_dim).movedim(1, 1 + batch_dim)
    return g if stacked else g[0]


def region_backward(
    entries: list[Entry],
    cotangents: list[Tensor],
    inputs: list,
    retain_graph: bool,
    state: VmapState,
) -> list[Tensor | None]:
    """One backward from the expansions' inputs, each row of ``cotangents`` (``[R, *S.shape]``)
    a row of its own, to ``inputs`` (edges and tensors): ``[R, …]`` per input, ``None`` where
    unreached."""
    return batched_vjp([e.source for e in entries], inputs, cotangents, retain_graph, state)
