"""The update's metrics as logged rows (train/metrics.py)."""

import numpy as np

from anatomy_r1_jax.train.metrics import UPDATE_METRICS, update_metrics


def test_update_metrics_gives_the_invalid_ratio_of_each_class_present():
    metrics = {k: np.float32(i) for i, k in enumerate(UPDATE_METRICS)}
    metrics["invalid_groups_by_category"] = np.array([1, 0, 2], np.int32)
    metrics["groups_by_category"] = np.array([4, 0, 2], np.int32)
    out = update_metrics(metrics, {"Liver": 0, "Gut": 1, "Omentum": 2})
    assert {k: out[k] for k in UPDATE_METRICS} == {k: float(i) for i, k in enumerate(UPDATE_METRICS)}
    assert out["invalid_gradient_ratio/Liver"] == 0.25 and out["invalid_gradient_ratio/Omentum"] == 1.0
    assert "invalid_gradient_ratio/Gut" not in out  # no group of that class in the step
