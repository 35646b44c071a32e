r"""Scalarizers: loss-only multi-task methods, which map the vector of losses to one scalar.

Same names, constructor arguments and call convention as ``torchjd.scalarization`` (TorchJD
0.18): ``s = scalarizer(losses)`` then ``s.backward()``. One backward, no per-loss gradient.
:class:`jdoptim.JDOptimizer` takes a scalarizer in place of an aggregator,
``JDOptimizer(opt, UW(2))``, and then also runs each method's machinery (training the learnable
log-scales, FAMO's logit update, DWA's epochs, STCH's warm-up) and reports each loss's effective
weight ``∂s/∂ℓᵢ`` in the step record; see :mod:`jdoptim.updates.scalarized`.

>>> import torch
>>> from jdoptim.scalarization import Mean
>>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
tensor(2.)
"""

from ._base import Scalarizer
from .constant import Constant
from .cosmos import COSMOS
from .dwa import DWA
from .famo import FAMO
from .geometric_mean import GeometricMean
from .imtl_l import IMTLL
from .mean import Mean
from .pbi import PBI
from .random_ import Random
from .stch import STCH
from .sum import Sum
from .uw import UW

__all__ = [
    "COSMOS",
    "DWA",
    "FAMO",
    "IMTLL",
    "PBI",
    "STCH",
    "UW",
    "Constant",
    "GeometricMean",
    "Mean",
    "Random",
    "Scalarizer",
    "Sum",
]
