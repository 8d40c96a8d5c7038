"""Run set-up from a config (train/experiment.py): what a run on a records file needs and builds."""

import os

import numpy as np
import pytest

from anatomy_r1_jax.data.synthetic import make_synthetic_dataset
from anatomy_r1_jax.train import experiment
from configs import synthetic


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    """A records file of someone's own data (here: a small synthetic set written elsewhere)."""
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("own")), n=30, seed=1, image_size=56)["train"]


def test_synthetic_config_on_a_records_file_builds_no_synthetic_eval_set(records_file, tmp_path):
    config = synthetic.get_config("method=grpo")
    config.data.train = records_file
    data = experiment.build_data(config, str(tmp_path))
    assert data.train and data.eval == [] and data.matrix_path == ""
    assert not os.path.exists(tmp_path / "data")  # the 8000-question benchmark was not generated


def test_plain_grpo_on_a_records_file_needs_no_similarity_source(records_file, tmp_path):
    """S(q) orders nothing under curriculum.schedule 'none': no matrix needed, scores NaN; the
    curriculum still names the missing source in one line."""
    config = synthetic.get_config("method=grpo")
    config.data.train = records_file
    data = experiment.build_data(config, str(tmp_path))
    scores = experiment.similarity_scores(config, data, model=None, tokenizer=None, workdir=str(tmp_path))
    assert scores.shape == (len(data.train),) and np.isnan(scores).all()
    config.curriculum.schedule = "staged"
    with pytest.raises(ValueError, match="curriculum.backend='matrix' needs curriculum.matrix"):
        experiment.similarity_scores(config, data, model=None, tokenizer=None, workdir=str(tmp_path))
