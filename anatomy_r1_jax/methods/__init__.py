"""Anatomy-R1's two methods, host side: similarity curriculum (ASC) and group diversity (GDQA)."""

from anatomy_r1_jax.methods.augmentation import (
    TRIGGERS,
    GDQAState,
    assign_group_variants,
    make_variants,
    permute_options,
    question_rephrasings,
    register_trigger,
)
from anatomy_r1_jax.methods.curriculum import SCHEDULES, Curriculum, curriculum_order, register_schedule
from anatomy_r1_jax.methods.similarity import (
    SIMILARITY_BACKENDS,
    QUESTION_SCORES,
    ClassSimilarity,
    answer_classes,
    load_scores,
    make_similarity,
    question_similarity,
    register_similarity,
    score_records,
    scores_array,
)
