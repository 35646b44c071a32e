"""Gradient aggregation: Aggregators (Jacobian → update) and Weightings (Gramian → weights)."""

from ._bases import Aggregator, GramianWeightedAggregator, Weighting
from ._mixins import Stateful
from .aligned_mtl import AlignedMTL, AlignedMTLWeighting
from .cagrad import CAGrad, CAGradWeighting
from .config import ConFIG, ConFIGWeighting
from .constant import Constant, ConstantWeighting
from .dualproj import DualProj, DualProjWeighting
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad, FairGradWeighting
from .flattening import Flattening
from .graddrop import GradDrop
from .gradvac import GradVac, GradVacWeighting
from .imtl_g import IMTLG, IMTLGWeighting
from .krum import Krum, KrumWeighting
from .mean import Mean, MeanWeighting
from .mgda import MGDA, MGDAWeighting
from .nash_mtl import NashMTL, NashMTLWeighting
from .pcgrad import PCGrad, PCGradWeighting
from .random_ import Random, RandomWeighting
from .sum import Sum, SumWeighting
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad, UPGradWeighting

__all__ = [
    "IMTLG",
    "MGDA",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "FairGrad",
    "FairGradWeighting",
    "Flattening",
    "GradDrop",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "NashMTL",
    "NashMTLWeighting",
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
