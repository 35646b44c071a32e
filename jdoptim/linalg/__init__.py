r"""Shared numerics: the bottom layer of jdoptim, below both the methods and the engine.

What lives here (one job per module):

* :mod:`.lcp` — the non-negative linear complementarity problem ``z ≥ 0, Mz + q ≥ 0,
  zᵀ(Mz + q) = 0`` by block principal pivoting, in numpy, with a KKT certificate per problem.
* :mod:`.batched_lcp` — the same problems batched in torch, on the matrix's device.
* :mod:`.equilibration` — diagonal equilibration ``D G D`` of a Gramian and the ridge
  ``+ εI`` grown until a Cholesky factorisation proves positive definiteness.
* :mod:`.dual_cone` — ``argmin_{v ≥ u} vᵀ G v`` (projection onto the dual cone of the rows of
  ``J``, in weight space) for many bounds ``u`` sharing one ``G``, and the sum of its solutions
  for the bounds ``diag(p)``.
* :mod:`.power_equation` — Newton's method for ``(G w)ᵢ = wᵢ^{-1/α}``.
* :mod:`.simplex` — Euclidean projection onto the probability simplex.
* :mod:`.gramian` — ``G = Σ_p J_p J_pᵀ`` from Jacobian blocks, and the reshapes between a
  flat ``[N, N]`` Gramian and the generalized ``[m₁..m_k, m_k..m₁]`` one.
* :mod:`.finite` — finiteness checks at the cost of one reduction and one synchronisation.
* :mod:`.vmap_fallback` — one batched backward by ``vmap``, or a loop where ``vmap`` cannot
  run, remembering which worked.
* :mod:`.sparse_rows` — compact rows of sparse (embedding) gradients, and making them dense.
* :mod:`.torch_errors` — torch's error types the library tells apart, across torch versions.
* :mod:`.user_frame` — the stack level of the user's code, for warnings.
* :mod:`.blas_threads` — numpy's BLAS on one thread while a solver works on a large Gramian
  (numpy's OpenBLAS pool otherwise fights torch's spinning OpenMP threads for the cores).

Who may import what: ``jdoptim.linalg`` imports nothing else from jdoptim (only torch, numpy,
threadpoolctl and, where a solver needs it, quadprog). Everything above it —
``jdoptim.aggregation`` (methods), ``jdoptim.scalarization``, ``jdoptim.autogram`` (the engine),
the update computers and the optimizer — may import from it. The contract is checked by
import-linter (``.importlinter`` at the repository root, run by ``lint-imports``).
"""
