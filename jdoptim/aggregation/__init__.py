"""Gradient aggregation: Aggregators (Jacobian → update) and Weightings (Gramian → weights).

A method's state (EMAs, cached weights, random generators, warn-once flags) is declared once in
its ``__init__`` (:mod:`jdoptim.aggregation._state`); ``reset()``, ``state_dict()`` and the
rank-0 synchronisation follow from the declarations.
"""

from ._bases import Aggregator, GramianWeightedAggregator, Weighting
from ._inputs import (
    CrossBatchWeighting,
    InputAggregator,
    InputWeightedAggregator,
    InputWeighting,
    MethodInputs,
)
from ._mixins import Stateful
from .aligned_mtl import AlignedMTL, AlignedMTLWeighting
from .cagrad import CAGrad, CAGradWeighting
from .config import ConFIG, ConFIGWeighting
from .constant import Constant, ConstantWeighting
from .crmogm import CRMOGMWeighting
from .dbmtl import DBMTL
from .dualproj import DualProj, DualProjWeighting
from .excess_mtl import ExcessMTL
from .fairgrad import FairGrad, FairGradWeighting
from .flattening import Flattening
from .graddrop import GradDrop
from .gradnorm import GradNorm, GradNormWeighting
from .gradvac import GradVac, GradVacWeighting
from .imtl import IMTL, IMTLWeighting
from .imtl_g import IMTLG, IMTLGWeighting
from .krum import Krum, KrumWeighting
from .mean import Mean, MeanWeighting
from .mgda import MGDA, MGDAWeighting
from .moco import MoCo
from .modo import MoDo, MoDoWeighting
from .nash_mtl import NashMTL, NashMTLWeighting
from .pcd import PCD, PCDWeighting
from .pcgrad import PCGrad, PCGradWeighting
from .random_ import Random, RandomWeighting
from .sdmgrad import SDMGrad, SDMGradWeighting
from .sum import Sum, SumWeighting
from .trimmed_mean import TrimmedMean
from .upgrad import UPGrad, UPGradWeighting

__all__ = [
    "DBMTL",
    "IMTL",
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "ConFIGWeighting",
    "Constant",
    "ConstantWeighting",
    "CrossBatchWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "FairGrad",
    "FairGradWeighting",
    "Flattening",
    "GradDrop",
    "GradNorm",
    "GradNormWeighting",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "IMTLWeighting",
    "InputAggregator",
    "InputWeightedAggregator",
    "InputWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MethodInputs",
    "MoCo",
    "MoDo",
    "MoDoWeighting",
    "NashMTL",
    "NashMTLWeighting",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGrad",
    "SDMGradWeighting",
    "Stateful",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "Weighting",
]
