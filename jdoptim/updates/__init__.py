r"""The update computers: what turns the losses of one step into the gradients to accumulate.

An *update computer* (:class:`~jdoptim.updates.base.UpdateComputer`) receives the step's
validated losses, the parameter plan (shared and specific parameters) and the aggregator, and
returns an :class:`~jdoptim.updates.base.UpdateResult`: the gradients ``d = Jᵀw`` (or ``A(J)``)
of the shared parameters, each specific parameter's own gradient, the weights and the Gramian.
It writes nothing: ``JDOptimizer.step`` accumulates the result into ``.grad``. Every phase of
the step that depends on the setting asks the computer through its declared interface
(``compute``, ``agree``, ``check``, ``step_optimizer``, ``max_loss_dim``, ``distributed``).

Modules:

* ``base.py``: the interface (``UpdateComputer``, ``UpdateResult``, ``UpdateRoute``) and the
  helpers every computer shares (``NonFiniteJacobianError``, ``ensure_finite``, ``weigh``,
  ``gramian_weights``, ``aggregate_jacobian``, ``nonfinite_part``);
* ``jacobian.py``: ``JacobianUpdate``, the explicit Jacobian by one batched backward (default);
* ``gramian.py``: ``GramianUpdate``, the hook-based Gramian engine (``modules=``);
* ``scaled.py``: ``ScaledUpdate``, any computer under a ``GradScaler`` (a wrapper);
* ``features.py``: ``FeaturesUpdate``, representation-level JD (``features=``);
* ``cross_batch.py``: ``CrossBatchUpdate``, the methods of two or three batches
  (``extra_batches=``);
* ``method.py``: ``RoutedUpdate`` and ``prepare_method``, which pick the route of a step whose
  method needs more than the Gramian;
* ``scalarized.py``: ``ScalarizedStep``, the step of the loss-only methods (scalarizers), which
  needs no Jacobian.

The distributed computers (``DistributedJacobianUpdate``, ``DistributedGramianUpdate``) are
their own subsystem, :mod:`jdoptim.distributed`, built on ``base.py``.

Who may import what: this package imports the engines (:mod:`jdoptim.autogram`,
:mod:`jdoptim.autojac`), the methods (:mod:`jdoptim.aggregation`, :mod:`jdoptim.scalarization`),
:mod:`jdoptim.linalg` and the core modules (losses, parameter plan, record, amp, grads); none of
those imports it, and it imports neither the optimizer nor :mod:`jdoptim.distributed`. The
contract is checked by ``lint-imports`` (``.importlinter``) and ``tests/test_layers.py``. The
old module paths (``jdoptim.update``, ``jdoptim.autogram.update``, ``jdoptim.features_step``,
``jdoptim.cross_batch``, ``jdoptim.method_step``, ``jdoptim.scalarized_step``) remain as
re-exports for user code; the library never imports them.
"""

from .base import NonFiniteJacobianError, UpdateComputer, UpdateResult
from .jacobian import JacobianUpdate

__all__ = ["JacobianUpdate", "NonFiniteJacobianError", "UpdateComputer", "UpdateResult"]
