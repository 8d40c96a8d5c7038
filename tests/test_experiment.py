"""Run set-up from a config (runtime/builders.py): what a run on a records file needs and builds."""

import os

import numpy as np
import pytest

from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.runtime import builders
from configs import synthetic


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    """A records file of someone's own data (here: a small synthetic set written elsewhere)."""
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("own")), n=30, seed=1, image_size=56)["train"]


def test_synthetic_config_on_a_records_file_builds_no_synthetic_eval_set(records_file, tmp_path):
    config = synthetic.get_config("method=grpo")
    config.data.train = records_file
    data = builders.build_data(config, str(tmp_path))
    assert data.train and data.eval == [] and data.matrix_path == ""
    assert not os.path.exists(tmp_path / "data")  # the 8000-question benchmark was not generated


def test_plain_grpo_on_a_records_file_needs_no_similarity_source(records_file, tmp_path):
    """S(q) orders nothing under curriculum.schedule 'none': no matrix needed, scores NaN; the
    curriculum still names the missing source in one line."""
    config = synthetic.get_config("method=grpo")
    config.data.train = records_file
    data = builders.build_data(config, str(tmp_path))
    scores = builders.similarity_scores(config, data, model=None, tokenizer=None, workdir=str(tmp_path))
    assert scores.shape == (len(data.train),) and np.isnan(scores).all()
    config.curriculum.schedule = "staged"
    with pytest.raises(ValueError, match="curriculum.backend='matrix' needs curriculum.matrix"):
        builders.similarity_scores(config, data, model=None, tokenizer=None, workdir=str(tmp_path))


def test_curriculum_score_chooses_the_question_score(records_file, tmp_path):
    """curriculum.score: "distractors" (S(q)) or "symmetric" (S_sym over all option pairs), each cached
    under its own fingerprint in the same workdir."""
    from anatomy_r1_jax.methods import similarity as sim_lib

    config = synthetic.get_config("method=asc")
    config.data.train = records_file
    config.curriculum.matrix = os.path.join(os.path.dirname(records_file), "class_similarity.json")
    data = builders.build_data(config, str(tmp_path))
    sim = sim_lib.make_similarity("matrix", matrix=config.curriculum.matrix)
    for score, fn in (("distractors", sim_lib.question_similarity), ("symmetric", sim_lib.symmetric_similarity)):
        config.curriculum.score = score
        got = builders.similarity_scores(config, data, model=None, tokenizer=None, workdir=str(tmp_path))
        np.testing.assert_allclose(got, [fn(r, sim) for r in data.train])
    assert not np.allclose([sim_lib.question_similarity(r, sim) for r in data.train], got)
