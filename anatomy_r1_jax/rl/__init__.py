"""RL maths: rewards (host side), group advantages and policy losses (pure jnp), by name."""

from anatomy_r1_jax.rl.advantages import (
    ADVANTAGES,
    group_advantages,
    invalid_counts_by_category,
    all_equal_groups,
    invalid_ratio_by_category,
    register_advantage,
    valid_group_fraction,
)
from anatomy_r1_jax.rl.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    GPGLoss,
    GRPOLoss,
    LossParts,
    PolicyLoss,
    SFTLoss,
    finalize_metrics,
    gpg_loss,
    gpg_loss_parts,
    grpo_loss,
    grpo_loss_parts,
    kl_weight,
    loss_config,
    loss_value,
    register_aggregation,
    register_policy_loss,
    sum_loss_parts,
)
from anatomy_r1_jax.rl.registry import Registry
from anatomy_r1_jax.rl.rewards import REWARDS, compute_rewards, register_reward
