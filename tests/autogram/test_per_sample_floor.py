"""The per-sample floor of ``benchmarks/hand_fused_per_sample.py`` must compute the library's step
(same Gramian, same ``.grad``) on the model it times, or its ratio is no floor."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("transformers")


def test_per_sample_floor_computes_the_library_step() -> None:
    from benchmarks.hand_fused_per_sample import PER_SAMPLE_MODELS, check_against_library

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for model_name in PER_SAMPLE_MODELS:
            assert check_against_library(model_name) < 1e-9
