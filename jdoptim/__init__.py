"""jdoptim: Jacobian descent for any PyTorch training loop.

>>> import torch
>>> from jdoptim import JDOptimizer, UPGrad
>>> model = torch.nn.Linear(3, 2)
>>> opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
>>> out = model(torch.randn(8, 3))
>>> record = opt.step([out[:, 0].pow(2).mean(), out[:, 1].abs().mean()])
>>> record.weights.shape
torch.Size([2])
"""

from . import scalarization  # loss-only methods: JDOptimizer(opt, scalarization.UW(2))
from .aggregation import Aggregator, GramianWeightedAggregator, Mean, Sum, UPGrad, Weighting
from .introspection import collect_loss_leaves
from .losses import StaleGraphError
from .optimizer import JDOptimizer
from .record import CommunicationStats, StepRecord

__all__ = [
    "Aggregator",
    "CommunicationStats",
    "GramianWeightedAggregator",
    "JDOptimizer",
    "Mean",
    "StaleGraphError",
    "StepRecord",
    "Sum",
    "UPGrad",
    "Weighting",
    "collect_loss_leaves",
    "scalarization",
]

__version__ = "0.1.0"
