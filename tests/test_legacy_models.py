"""Models registered by an earlier layout of the library still load and predict the same."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO

LEGACY = REPO / "tests" / "data" / "legacy_models"


@pytest.mark.parametrize("name", ["legacy-restorer", "legacy-medium-tier"])
def test_a_model_registered_before_the_move_loads_and_predicts_the_same(name):
    from perceive_ir.products import load_model

    images = np.load(LEGACY / "input.npy")
    model = load_model(str(LEGACY / name))  # refuses pickled content, then MLflow runs the model's own code copy
    np.testing.assert_array_equal(model.predict(images), np.load(LEGACY / f"{name}-output.npy"))
