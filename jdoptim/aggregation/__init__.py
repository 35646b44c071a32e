"""Gradient aggregation: Aggregators (Jacobian → update) and Weightings (Gramian → weights)."""

from ._bases import Aggregator, GramianWeightedAggregator, Weighting
from ._mixins import Stateful
from .config import ConFIG, ConFIGWeighting
from .constant import Constant, ConstantWeighting
from .dualproj import DualProj, DualProjWeighting
from .excess_mtl import ExcessMTL
from .graddrop import GradDrop
from .gradvac import GradVac, GradVacWeighting
from .krum import Krum, KrumWeighting
from .mean import Mean, MeanWeighting
from .pcgrad import PCGrad, PCGradWeighting
from .random_ import Random, RandomWeighting
from .sum import Sum, SumWeighting
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad, UPGradWeighting

__all__ = [
    "Aggregator",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "GradDrop",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "Krum",
    "KrumWeighting",
    "Mean",
    "MeanWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "Stateful",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
]
