"""Multi-host training on one machine: data shards' prompt batches join into the one-process batch,
and train.py as two processes (4 CPU devices each, jax.distributed with gloo collectives) matches
the same run as one process with 8 devices."""

import jax
import numpy as np
import pytest

from anatomy_r1_jax.data.collate import BatchShape, Collator, ImageFeatures
from anatomy_r1_jax.data.records import Record
from anatomy_r1_jax.rl.rollout import image_embeddings
from anatomy_r1_jax.train import experiment


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(request, tmp_path_factory):
    from configs.default import get_config

    config = get_config()
    config.model.family = request.param
    tokenizer = experiment.build_tokenizer(config, str(tmp_path_factory.mktemp("tok")))
    model = experiment.build_model(config, tokenizer)
    return model, Collator(tokenizer, model.config, BatchShape(prompt_length=96, completion_length=8,
                                                              patches_per_query=16))


def _query(i: int, grid: tuple[int, int, int]):
    record = Record(id=f"q{i}", images=(f"{i}.png",), question=f"Which structure is in image {i}?",
                    options=("Liver", "Gut"), answer="A", answer_text="Liver", prompt_variant="compact")
    pixels = np.random.default_rng(i).normal(size=(int(np.prod(grid)), 1176)).astype(np.float32)
    return [record, record], ImageFeatures(pixels, np.array([grid]))


def test_shard_prompt_batches_join_into_the_one_process_batch(tiny):
    model, collator = tiny
    full = [_query(i, (1, 4, 4)) for i in range(4)]  # every query fills its patch budget
    pack = lambda qs: collator.prompts([g for g, _ in qs], [f for _, f in qs])  # noqa: E731
    joined, whole = collator.concat([pack(full[:2]), pack(full[2:])]), pack(full)
    for a, b in zip(jax.tree.leaves(joined), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)

    # Queries of 8 patches leave padding inside each shard's batch: every image token must still
    # get its own query's encoding (that of the query packed alone).
    mixed = [_query(i, (1, 4, 4) if i % 2 else (1, 2, 4)) for i in range(4)]
    alone = [np.asarray(image_embeddings(model, pack([q])))[: 2 * q[1].pixel_values.shape[0] // 4] for q in mixed]
    want = np.concatenate(alone)
    for batch in (pack(mixed), collator.concat([pack(mixed[:2]), pack(mixed[2:])])):
        got = np.asarray(image_embeddings(model, batch))[: len(want)]
        np.testing.assert_allclose(got, want, atol=1e-5)

