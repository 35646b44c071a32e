"""The ``python -m jdoptim`` demonstration: Jacobian descent against the summed loss.

Two experiments on built-in data (nothing to download):

* :mod:`~jdoptim.demo.multitask`: three regression tasks sharing a trunk, where the summed loss
  sacrifices a task and Jacobian descent does not (one seed in detail, then the summed loss and
  UPGrad over ten seeds);
* :mod:`~jdoptim.demo.toy`: the two-objective toy problem of CAGrad (Liu et al., 2021) and
  Nash-MTL (Navon et al., 2022), optimised from several starting points: where each run ends on
  the Pareto set, and how fast it gets there.

The methods come from :mod:`jdoptim.catalog`.

:func:`jdoptim.demo.cli.main` is the command line; each part is usable on its own.
"""
