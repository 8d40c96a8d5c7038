"""The rollout's prompt width (rl.prompt_buckets): a call's left-padded prompts cut to the smallest
bucket width that holds its longest prompt decode exactly what the full width decodes, and the
trainer's rollout compiles and runs at that width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rollout_step import make_model, prompt_batch

from anatomy_r1_jax.data.batch import prompt_width, trim_prompts
from anatomy_r1_jax.rl.rollout import generate
from anatomy_r1_jax.rl.sampling import SamplingConfig
from anatomy_r1_jax.train.micro_batches import bucket_lengths

LP = 64  # the prompt budget; prompt_batch's prompts hold 15 and 18 tokens


def test_the_width_is_the_smallest_bucket_holding_the_longest_prompt():
    widths = bucket_lengths(LP, 4)
    assert widths == (16, 32, 48, 64)
    batch = prompt_batch(queries=2, group=2, lp=LP)
    assert batch.attention_mask.sum(1).max() == 18 and prompt_width(batch.attention_mask, widths) == 32
    assert prompt_width(batch.attention_mask, (LP,)) == LP  # rl.prompt_buckets = 1: no cut
    cut = trim_prompts(batch, 32)
    assert cut.input_ids.shape == (4, 32) and cut.position_ids.shape == (3, 4, 32)
    np.testing.assert_array_equal(cut.input_ids, batch.input_ids[:, -32:])
    np.testing.assert_array_equal(cut.image_rows, batch.image_rows)
    with pytest.raises(ValueError, match="longer than the width 16"):
        trim_prompts(batch, 16)


@pytest.mark.parametrize("greedy", [True, False])
def test_a_cut_prompt_decodes_what_the_full_width_decodes(greedy):
    """Greedy and sampled (the same key) rollouts of shared-prefix groups: the same tokens, log-probs
    to fp32 round-off; the positions after the cut prompt continue where the full one's do."""
    model = make_model(seed=1)
    batch = prompt_batch(queries=2, group=1, lp=LP)
    sc = SamplingConfig(max_new_tokens=10, greedy=greedy, temperature=0.9, top_k=20, top_p=0.95, eos_ids=(7,),
                        pad_id=0)
    run = jax.jit(lambda b, k: generate(model, b, k, sc, group_size=3))
    full = run(jax.tree.map(jnp.asarray, batch), jax.random.key(5))
    cut = run(jax.tree.map(jnp.asarray, trim_prompts(batch, prompt_width(batch.attention_mask, bucket_lengths(LP, 4)))),
              jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(cut.ids), np.asarray(full.ids))
    np.testing.assert_array_equal(np.asarray(cut.lengths), np.asarray(full.lengths))
    np.testing.assert_allclose(np.asarray(cut.logps), np.asarray(full.logps), atol=1e-5)
    assert len({tuple(r) for r in np.asarray(full.ids)}) > 1  # the rows are not all one constant answer
