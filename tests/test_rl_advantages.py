import jax
import numpy as np
import pytest

from anatomy_r1_jax.rl import advantages as adv


def _reference(rewards, g, scale, eps=1e-4):
    out = []
    for start in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[start : start + g]]
        mean = sum(grp) / g
        std = (sum((x - mean) ** 2 for x in grp) / (g - 1)) ** 0.5
        out += [(x - mean) / (std + eps) if scale else x - mean for x in grp]
    return np.array(out)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_reference(scale):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, size=24).astype(np.float32)
    rewards[8:12] = 1.0  # an all-equal group
    got = jax.jit(adv.group_advantages, static_argnames=("group_size", "scale"))(rewards, group_size=4, scale=scale)
    np.testing.assert_allclose(got, _reference(rewards, 4, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[8:12], 0.0)


def test_registered_estimators():
    r = np.array([0, 1, 1, 1, 2, 0, 0, 0], np.float32)
    np.testing.assert_allclose(adv.ADVANTAGES.get("grpo")(r, 4), _reference(r, 4, True), rtol=1e-5)
    np.testing.assert_allclose(adv.ADVANTAGES.get("drgrpo")(r, 4), _reference(r, 4, False), rtol=1e-6)
    # unbiased std: group [0, 1, 1, 1] has sum of squares 0.75, std sqrt(0.75 / 3) = 0.5 (biased: 0.433)
    np.testing.assert_allclose(adv.grpo_advantages(r, 4)[0], -0.75 / (0.5 + 1e-4), rtol=1e-5)
    with pytest.raises(ValueError):
        adv.group_advantages(r, 3)
    with pytest.raises(ValueError):
        adv.group_advantages(r[:1], 1)


def test_invalid_groups_and_categories():
    r = np.array([1, 1, 0, 0, 0, 0, 2, 2, 2, 1, 0, 1], np.float32)  # groups of 3
    invalid = adv.all_equal_groups(r, 3)
    np.testing.assert_array_equal(invalid, [False, True, True, False])
    np.testing.assert_allclose(adv.valid_group_fraction(r, 3), 0.5)
    inv, cnt = adv.invalid_counts_by_category(invalid, np.array([0, 0, 2, 2]), 3)
    np.testing.assert_array_equal(inv, [1, 0, 1])
    np.testing.assert_array_equal(cnt, [2, 0, 2])
    ratio = np.asarray(adv.invalid_ratio_by_category(r, 3, np.array([0, 0, 2, 2]), 3))
    np.testing.assert_allclose(ratio[[0, 2]], [0.5, 0.5])
    assert np.isnan(ratio[1])
