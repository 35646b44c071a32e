import pytest
import torch
from torch import nn

from jdoptim import introspection
from jdoptim.introspection import collect_loss_leaves, iter_tensors, leaf_reach
from tests.models import MultiTaskMLP


def _ids(tensors):
    return {id(t) for t in tensors}


def test_collects_exactly_the_parameters_backward_would_reach():
    model = MultiTaskMLP(n_tasks=3)
    x = torch.randn(4, 6)
    out = model(x)
    losses = [out[0].sum(), out[2].sum()]  # head 1 is not used
    expected = [p for n, p in model.named_parameters() if not n.startswith("heads.1")]
    # Independent oracle: which parameters does backward() fill?
    sum(losses).backward(retain_graph=True)
    reached_by_backward = [p for p in model.parameters() if p.grad is not None]
    assert _ids(collect_loss_leaves(losses)) == _ids(expected) == _ids(reached_by_backward)


def test_accepts_tensors_mappings_and_nests_and_ignores_non_tensors():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    la, lb = a.sum() * 2, b.pow(2).sum()
    nested = {"x": [la, ("text", 3, None)], "y": {"z": (lb,)}}
    assert _ids(collect_loss_leaves(nested)) == _ids([a, b])
    assert _ids(collect_loss_leaves(la)) == _ids([a])
    assert collect_loss_leaves([1.0, "loss", None]) == set()
    assert len(list(iter_tensors(nested))) == 2


def test_detached_subtrees_and_frozen_leaves_contribute_nothing():
    used, frozen, detached = (nn.Parameter(torch.ones(2)) for _ in range(3))
    frozen.requires_grad_(False)
    loss = (used * frozen).sum() + (detached * 3).detach().sum()
    assert _ids(collect_loss_leaves(loss)) == _ids([used])


def test_a_loss_that_is_itself_a_leaf_reaches_itself():
    p = nn.Parameter(torch.tensor(2.0))
    assert _ids(collect_loss_leaves([p])) == _ids([p])


def test_masks_tell_which_loss_reaches_which_leaf():
    trunk, h1, h2 = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    z = trunk(torch.randn(5, 3))
    losses = [h1(z).sum(), h2(z).sum(), z.sum()]
    masks = {id(leaf): mask for leaf, mask in leaf_reach(losses)}
    assert masks[id(trunk.weight)] == 0b111
    assert masks[id(h1.weight)] == masks[id(h1.bias)] == 0b001
    assert masks[id(h2.weight)] == 0b010
    assert len(masks) == 6


def test_a_shared_trunk_is_walked_once_not_once_per_loss(monkeypatch):
    layers = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
    z = layers(torch.randn(2, 4))
    losses = [z[:, 0].sum() * i for i in range(1, 9)]
    calls: dict[object, int] = {}
    original = introspection._children

    def counting(node):
        calls[node] = calls.get(node, 0) + 1
        return original(node)

    monkeypatch.setattr(introspection, "_children", counting)
    leaves = leaf_reach(losses)
    assert len(leaves) == 40
    # One enumeration to discover the node, one to propagate the masks: never once per loss.
    assert max(calls.values()) <= 2


def test_nodes_are_keyed_by_node_objects_so_many_graphs_in_a_row_stay_correct():
    # Short-lived graphs whose node wrappers would recycle ids must not confuse the walk.
    for _ in range(50):
        p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
        losses = [(p * 2).sum(), (q.exp() + p).sum()]
        masks = {id(leaf): mask for leaf, mask in leaf_reach(losses)}
        assert masks == {id(p): 0b11, id(q): 0b10}


@pytest.mark.parametrize("split", [list, torch.unbind])
def test_losses_that_share_their_node_reach_what_it_reaches(split) -> None:
    """``list(vector)`` and ``torch.unbind(vector)``: the losses are outputs of one node (the
    graph does not say which output leads where, so each reaches every leaf below the node)."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    losses = split(torch.stack([a.sum(), (b * 2).sum()]))
    assert _ids(collect_loss_leaves(losses)) == _ids([a, b])
    masks = {id(leaf): mask for leaf, mask in leaf_reach(list(losses))}
    assert masks == {id(a): 0b11, id(b): 0b11}
