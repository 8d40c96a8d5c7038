"""Per-phase learning-rate schedules (train/schedules.py) read from the config."""

import numpy as np
import pytest

from anatomy_r1_jax.train.schedules import phase_schedules
from configs import default


def _config(**optim):
    c = default.get_config()
    c.sft.update(steps=10, lr=1e-3, warmup_steps=4, schedule="constant")
    c.train.steps = 20
    c.optim.update(lr=2e-4, **optim)
    return c


def test_each_phase_has_its_own_schedule_from_its_first_step():
    s = phase_schedules(_config(warmup_steps=0, schedule="cosine"))
    # warm-up: 0 -> lr over 4 steps, then constant
    np.testing.assert_allclose([float(s["sft"](i)) for i in (0, 2, 4, 9)], [0.0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    # GRPO counts from its own step 0: no warm-up means full lr on its first step, cosine to 0.1 lr
    assert float(s["grpo"](0)) == pytest.approx(2e-4)
    assert float(s["grpo"](10)) == pytest.approx(2e-4 * (0.1 + 0.9 * 0.5), rel=1e-5)
    assert float(s["grpo"](20)) == pytest.approx(2e-5, rel=1e-5)


@pytest.mark.parametrize("name,expected", [("constant", [0.0, 2e-4, 2e-4, 2e-4]),
                                           ("linear", [0.0, 2e-4, 1e-4, 0.0])])
def test_schedule_names(name, expected):
    grpo = phase_schedules(_config(warmup_steps=2, schedule=name))["grpo"]
    np.testing.assert_allclose([float(grpo(i)) for i in (0, 2, 11, 20)], expected, rtol=1e-5, atol=1e-12)


def test_a_phase_that_trains_lora_adapters_scales_its_learning_rate():
    c = _config(warmup_steps=0)
    c.model.lora.update(rank=8, lr_scale=10.0, warmup="full")
    s = phase_schedules(c)
    assert float(s["sft"](9)) == pytest.approx(1e-3)  # a full warm-up trains the base: sft.lr
    assert float(s["grpo"](0)) == pytest.approx(2e-3)  # GRPO trains the adapters
    c.model.lora.warmup = "adapters"
    assert float(phase_schedules(c)["sft"](9)) == pytest.approx(1e-2)
    c.model.lora.rank = 0  # no LoRA: no factor
    assert float(phase_schedules(c)["grpo"](0)) == pytest.approx(2e-4)


def test_unknown_schedule_names_its_field():
    with pytest.raises(ValueError, match="optim.schedule='cosin'"):
        phase_schedules(_config(schedule="cosin"))
