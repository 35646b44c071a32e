"""Gradient aggregation: Aggregators (Jacobian → update) and Weightings (Gramian → weights)."""

from ._bases import Aggregator, GramianWeightedAggregator, Weighting
from ._mixins import Stateful
from .mean import Mean, MeanWeighting
from .sum import Sum, SumWeighting
from .upgrad import UPGrad, UPGradWeighting

__all__ = [
    "Aggregator",
    "GramianWeightedAggregator",
    "Mean",
    "MeanWeighting",
    "Stateful",
    "Sum",
    "SumWeighting",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
]
