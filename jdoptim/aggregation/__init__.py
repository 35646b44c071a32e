"""Gradient aggregation: Aggregators (Jacobian → update) and Weightings (Gramian → weights).

What lives here: the methods, one file each (``upgrad.py``: :class:`UPGrad` and
:class:`UPGradWeighting`, …), with the math and the paper in each module's docstring; their
contracts (``_bases.py``: :class:`Aggregator`, :class:`Weighting`,
:class:`GramianWeightedAggregator` and the input checks; ``_inputs.py``: weightings that see more
than the Gramian); and what several methods share at the level of a method: argument checks and
the default preference (``arguments.py``), the dual-cone weighting base of UPGrad and DualProj
(``dual_cone_weighting.py``), the warn-once report of a degraded solve (``solver_warnings.py``),
scale handling (``_scaling.py``), non-differentiability, state and randomness mixins
(``_mixins.py``, ``_randomness.py``).

What does not live here: general numerics (equilibration and ridge, the LCP and Newton solvers,
the dual-cone solve, simplex projection, Gramian reshapes, finiteness checks) are in
:mod:`jdoptim.linalg`, below the methods; reference solvers used only by tests are in ``tests/``.

Who may import what: a method imports :mod:`jdoptim.linalg` and this package, nothing else from
jdoptim: never the engines (:mod:`jdoptim.autogram`, :mod:`jdoptim.autojac`), the update
computers, :mod:`jdoptim.distributed` or the optimizer, which sit above it and call the methods
with a Jacobian or a Gramian. :mod:`jdoptim.scalarization` is a sibling that uses the mixins here.
The contract is checked by ``lint-imports`` (``.importlinter``) and ``tests/test_layers.py``.

A method's state (EMAs, cached weights, random generators, warn-once flags) is declared once in
its ``__init__`` (:mod:`jdoptim.aggregation.state`); ``reset()``, ``state_dict()`` and the
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
