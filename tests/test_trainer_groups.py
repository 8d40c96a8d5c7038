"""The trainer's groups with a scripted policy: GDQA pooling (each row's prompt, completion, reward and
record line up, S prompt rows per group), GDQA online / dynamic-sampling re-rolls (exactly the
all-equal groups' rows replaced, before the update), and the learning rate each phase applies.

The scripted policy stands in for the compiled rollout: it reads each completion row's prompt (the
prompt row the rollout engine expands it from: row q * G + j <- prompt row q * S + j % S) and answers
by a rule on that prompt, tagging the completion with its rollout call."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from anatomy_r1_jax.data.batch import Completions
from anatomy_r1_jax.train.trainer import Trainer
from configs import default

G = 4
OPTION_RE = re.compile(r"^([A-Z])\. (.+?)(?:<\|im_end\|>.*)?$")


def _config(**gdqa):
    c = default.get_config()
    c.sft.update(steps=1, batch_size=4, warmup_steps=0, schedule="constant", lr=1e-3)
    c.optim.update(lr=1e-5, warmup_steps=0, schedule="constant")
    c.train.update(steps=3, batch_size=4, micro_batches=2)
    c.rl.update(group_size=G, max_completion_length=24, beta=0.0, prompt_buckets=12)  # widths 8, 16, ..., 96
    c.data.update(eval_size=4)
    c.data.synthetic.n = 60
    c.model.tiny.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    c.gdqa.update(trigger="off", calibration="", num_variants=2, **gdqa)
    return c


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    return Trainer(_config(), str(tmp_path_factory.mktemp("groups")))


def _options(prompt: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in prompt.splitlines() if (m := OPTION_RE.match(line))}


class ScriptedPolicy:
    """A step collector's rollout (train/collector.py Rollout): answer(call, row, prompt) -> the
    completion text of row `row`."""

    def __init__(self, run, answer):
        self.run, self.answer, self.prompts = run, answer, []

    def __call__(self, batch, key, group_size, prompts_per_group):
        ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
        tok = self.run.tokenizer
        decoded = [tok.decode(row[m > 0].tolist(), skip_special_tokens=False) for row, m in zip(ids, mask)]
        s, q = prompts_per_group, len(decoded) // prompts_per_group
        rows = [decoded[p * s + j % s] for p in range(q) for j in range(group_size)]
        call = len(self.prompts)
        self.prompts.append(rows)
        texts = [self.answer(call, k, prompt) for k, prompt in enumerate(rows)]
        cids, cmask = self.run.collator.targets(texts, self.run.eos_id)
        return Completions(ids=cids, mask=cmask, logps=np.zeros(cids.shape, np.float32), lengths=cmask.sum(-1))


class Steps:
    """The step collector of the trainer's run with `settings` (gdqa.* / rl.*: its GDQA state, re-roll
    policy and rollout calls rebuilt from them), driven by the scripted policy over a fresh data
    iterator: `collect(step)` -> (TrainBatches, metrics) as a GRPO step makes them; `records`: the
    steps' queries, in order."""

    def __init__(self, trainer, answer, **settings):
        from anatomy_r1_jax.methods.augmentation import GDQAState
        from anatomy_r1_jax.methods.reroll import reroll_policy
        from anatomy_r1_jax.runtime.placement import rollout_calls

        c = _config()
        for field, value in settings.items():
            section, name = field.split(".")
            c[section][name] = value
        self.run, self.config = trainer.run_parts, c
        self.gdqa = GDQAState(trigger=c.gdqa.trigger, num_variants=c.gdqa.num_variants, kinds=tuple(c.gdqa.kinds))
        self.collector = dataclasses.replace(self.run.collector, reroll=reroll_policy(c),
                                             calls=rollout_calls(c.train.batch_size, c.rl.rollout_batch_size, 1))
        self.policy, self.records, self.it = ScriptedPolicy(self.run, answer), [], iter(self.run.pipeline)

    def collect(self, step):
        queries = next(self.it)
        self.records += [q.record for q in queries]
        seed = self.config.seed
        return self.collector.collect(queries, self.it.unreadable, self.policy, self.gdqa,
                                      jax.random.fold_in(jax.random.key(seed), step), np.random.default_rng([seed, step]))


def _rows(trainer, batch):
    """(the prompt text of each completion row as the update expands the batch's S prompt rows,
    the completion texts, the rewards, S)."""
    ids, mask = np.asarray(batch.prompt.input_ids), np.asarray(batch.prompt.attention_mask)
    decoded = [trainer.run_parts.tokenizer.decode(r[m > 0].tolist(), skip_special_tokens=False) for r, m in zip(ids, mask)]
    texts = trainer.run_parts.decode(batch.completions)
    q = len(texts) // G
    s = len(decoded) // q
    prompts = [decoded[p * s + j % s] for p in range(q) for j in range(G)]
    return prompts, texts, np.asarray(batch.rewards), s


def _letter(text):
    return re.search(r"<answer>(.*)</answer>", text).group(1)


def _call(text):
    return int(re.search(r"<think>(\d+)</think>", text).group(1))


def _reward_of_a(prompt, record):
    """format 1 + accuracy of answering "A" to `prompt`, a variant of `record`."""
    assert record.question in prompt
    return 1.0 + float(_options(prompt)["A"] == record.answer_text)


def answer_a(call, k, prompt):
    return f"<think>{call}</think><answer>A</answer>"


@pytest.mark.parametrize("rollout_batch_size", [0, 2])
def test_gdqa_pooling_rows_prompts_rewards_and_records_line_up(trainer, monkeypatch, rollout_batch_size):
    """GDQA variants on every group (trigger "always", 2 option orders per group of G = 4: S = 2
    prompt rows per group). The policy answers "A", so a row is right exactly when its prompt's
    option A is its query's answer: each row's reward must be that of its own prompt row
    (q * S + j % S), of its own query (micro-batch slices in order), whether the step's 4 queries
    are rolled out in one call (rl.rollout_batch_size=0) or in one call per micro-batch of 2."""
    steps = Steps(trainer, answer_a, **{"gdqa.trigger": "always", "gdqa.kinds": ("permute",),
                                                              "rl.rollout_batch_size": rollout_batch_size})
    policy = steps.policy
    records = steps.records
    batches, out = steps.collect(5)
    assert [len(rows) for rows in policy.prompts] == ([4 * G] if rollout_batch_size == 0 else [2 * G, 2 * G])
    assert out["prompts_per_group"] == 2.0 and out["gdqa_triggered"] == 1.0
    expected_all, swapped_all = [], []
    for i, b in enumerate(batches):
        prompts, texts, rewards, s = _rows(trainer, b)
        assert s == 2 and all(_letter(t) == "A" for t in texts)
        queries = records[i * 2:(i + 1) * 2]
        expected = [_reward_of_a(prompts[k], queries[k // G]) for k in range(len(texts))]
        np.testing.assert_array_equal(rewards, expected)
        for p in range(2):
            assert len({prompts[p * G + j] for j in range(G)}) == 2  # rows alternate over the two variants
        expected_all += expected
        swapped_all += [_reward_of_a(prompts[k ^ 1], queries[k // G]) for k in range(len(texts))]
    assert expected_all != swapped_all  # the check can tell the variants of a group apart


def test_online_reroll_replaces_exactly_the_all_equal_groups(trainer, monkeypatch):
    """GDQA online: the first rollouts answer "A" except for a row without format in group 0 of
    micro-batch 0 and in both groups of micro-batch 1 (those groups diverge). The one re-roll (call
    2, micro-batch 0) must replace exactly the rows of group 1 of micro-batch 0, now over 4 variants;
    micro-batch 1, not re-rolled, must still get S = 4 prompt rows per group for its plain groups."""
    diverge = {(0, 0), (1, 0), (1, G)}

    def answer(call, k, prompt):
        return "oops" if (call, k) in diverge else answer_a(call, k, prompt)

    steps = Steps(trainer, answer, **{"gdqa.trigger": "online", "gdqa.kinds": ("permute",),
                                                            "gdqa.num_variants": 4, "rl.rollout_batch_size": 2})
    policy = steps.policy
    records = steps.records
    batches, out = steps.collect(7)
    assert len(policy.prompts) == 3  # 2 micro-batch rollouts + 1 re-roll (max_rerolls = 1)
    calls = [[_call(t) if t != "oops" else -1 for t in _rows(trainer, b)[1]] for b in batches]
    assert calls == [[-1] + [0] * (G - 1) + [2] * G, [-1] + [1] * (G - 1) + [-1] + [1] * (G - 1)]
    for i, b in enumerate(batches):
        prompts, texts, rewards, s = _rows(trainer, b)
        assert s == 4
        for p in range(2):
            variants = len({prompts[k] for k in range(p * G, (p + 1) * G)})
            assert variants == (4 if (i, p) == (0, 1) else 1)
            expected = [_reward_of_a(prompts[k], records[2 * i + p]) if texts[k] != "oops" else 0.0
                        for k in range(p * G, (p + 1) * G)]
            np.testing.assert_array_equal(rewards[p * G:(p + 1) * G], expected)
    rerolled = _rows(trainer, batches[0])[2][G:]
    assert out["gdqa/rerolled_groups"] == 1.0 and out["gdqa/rescued_groups"] == float(len(set(rerolled)) > 1)
    assert out["gdqa/reroll_rows"] == 2 * G  # one fixed-shape call of 2 groups (padding included)
    assert out["prompts_per_group"] == 4.0
    # the trigger state sees the final groups
    assert steps.gdqa.last_all_equal[records[0].id] is False
    assert steps.gdqa.last_all_equal[records[1].id] is (len(set(rerolled)) == 1)


def test_one_rollout_call_per_step_feeds_every_micro_batch(trainer, monkeypatch):
    """rl.rollout_batch_size=0 (the default): the step's 4 queries are rolled out in one call, and
    so are the re-rolls, whatever train.micro_batches (2 here); the update's micro-batches are that
    call's groups in order. GDQA online: rows "oops" make group 0 (row 0) and group 2 (row 2G) of
    the call diverge, so the one re-roll call (call 1, all 4 groups, padding included) must replace
    exactly groups 1 and 3, i.e. group 1 of each micro-batch."""
    diverge = {(0, 0), (0, 2 * G)}

    def answer(call, k, prompt):
        return "oops" if (call, k) in diverge else answer_a(call, k, prompt)

    steps = Steps(trainer, answer, **{"gdqa.trigger": "online", "gdqa.kinds": ("permute",),
                                                            "gdqa.num_variants": 4})
    policy = steps.policy
    records = steps.records
    batches, out = steps.collect(7)
    assert [len(rows) for rows in policy.prompts] == [4 * G, 4 * G]  # the step's rollout, then its re-roll
    assert len(batches) == 2
    calls = [[_call(t) if t != "oops" else -1 for t in _rows(trainer, b)[1]] for b in batches]
    assert calls == [[-1] + [0] * (G - 1) + [1] * G] * 2
    for i, b in enumerate(batches):
        prompts, texts, rewards, s = _rows(trainer, b)
        for p in range(2):
            query = records[2 * i + p]
            assert all(query.question in prompts[k] for k in range(p * G, (p + 1) * G))
            expected = [_reward_of_a(prompts[k], query) if texts[k] != "oops" else 0.0
                        for k in range(p * G, (p + 1) * G)]
            np.testing.assert_array_equal(rewards[p * G:(p + 1) * G], expected)
    assert out["gdqa/rerolled_groups"] == 2.0 and out["gdqa/reroll_rows"] == 4 * G


def test_length_aware_micro_batches_sort_groups_and_trim_them_to_buckets(trainer, monkeypatch):
    """train.length_buckets=4 (the default; T = 24: buckets 8, 16, 24): the step's groups sorted by
    their longest completion into the micro-batches (queries 1 and 3 answer briefly, 0 and 2 at
    length), each micro-batch trimmed to its bucket, its rows' prompts, completions and rewards
    still lined up with their queries."""
    assert trainer.run_parts.length_buckets == (8, 16, 24)

    def answer(call, k, prompt):
        return f"<think>{call}</think><answer>A</answer>" if (k // G) % 2 else \
            f"<think>{call}{'0' * 9}</think><answer>A</answer>"

    steps = Steps(trainer, answer)
    records = steps.records
    batches, out = steps.collect(5)
    short, long = (len(trainer.run_parts.collator.targets([answer(0, k, "")], trainer.run_parts.eos_id)[1][0].nonzero()[0]) for k in (G, 0))
    widths = [b.completions.ids.shape[1] for b in batches]
    assert widths == [next(n for n in (8, 16, 24) if n >= length) for length in (short, long)] and widths[0] < 24
    assert out["update_length_fraction"] == pytest.approx(sum(widths) / 48)
    for b, queries in zip(batches, ([1, 3], [0, 2])):
        prompts, texts, rewards, _ = _rows(trainer, b)
        for p, q in enumerate(queries):
            query = records[q]
            assert all(query.question in prompts[k] for k in range(p * G, (p + 1) * G))
            assert all(texts[k] == answer(0, q * G, "") for k in range(p * G, (p + 1) * G))
            np.testing.assert_array_equal(rewards[p * G:(p + 1) * G],
                                          [_reward_of_a(prompts[k], query) for k in range(p * G, (p + 1) * G)])


@pytest.mark.parametrize("rounds", [1, 3])
def test_dynamic_resample_rerolls_the_same_prompts_for_bounded_rounds(trainer, monkeypatch, rounds):
    """rl.dynamic_sampling="resample": all-equal groups are rolled out again from the same prompts
    (1 prompt row per group). Both groups of each micro-batch start all-equal; re-roll round 1 rescues
    group 0, round 2 leaves group 1 all-equal, round 3 rescues it. A rescued group is not re-rolled
    again, and max_resample_rounds bounds the rounds."""

    def answer(call, k, prompt):
        if call < 2:
            return answer_a(call, k, prompt)
        r = (call - 2) % rounds
        if (r, k) in ((0, 0), (2, G)):
            return "oops"
        return f"<think>{call}</think><answer>{'A' if r == 0 else 'B'}</answer>"

    steps = Steps(trainer, answer, **{"rl.dynamic_sampling": "resample",
                                                      "rl.max_resample_rounds": rounds, "rl.rollout_batch_size": 2})
    policy = steps.policy
    batches, out = steps.collect(9)
    assert len(policy.prompts) == 2 + 2 * rounds
    for i, b in enumerate(batches):
        prompts, texts, rewards, s = _rows(trainer, b)
        assert s == 1 and len(set(prompts[:G])) == 1 and len(set(prompts[G:])) == 1
        first = 2 + rounds * i
        assert texts[0] == "oops" and all(_call(t) == first for t in texts[1:G])
        if rounds == 3:
            assert texts[G] == "oops" and all(_call(t) == first + 2 for t in texts[G + 1:])
        else:
            assert all(_call(t) == first for t in texts[G:]) and len(set(rewards[G:])) == 1
    assert out["dynamic_sampling/rerolled_groups"] == 4.0
    assert out["dynamic_sampling/rescued_groups"] == (4.0 if rounds == 3 else 2.0)
    assert out["dynamic_sampling/reroll_rows"] == rounds * 2 * 2 * G
    assert "gdqa/rerolled_groups" not in out


def test_each_phase_applies_its_own_learning_rate(trainer, monkeypatch):
    """Constant schedules, no warm-up: AdamW's first step moves every weight with a gradient well
    above eps by lr (|m / sqrt v| = 1 on step 1). Warm-up lr 1e-3, then GRPO lr 1e-5 with fresh
    moments: the largest move and the typical (median) move of each phase must be its lr. (Moments
    carried over from the warm-up would give GRPO's weights moves of about 0.5 - 1 lr.)"""

    def moves(before, after):
        return np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).ravel()
                               for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))])

    def check(delta, lr):
        moved = delta[delta > 0.1 * lr]
        assert len(moved) > 0.5 * len(delta)
        assert delta.max() == pytest.approx(lr, rel=0.02)
        assert np.median(moved) == pytest.approx(lr, rel=0.02)

    def varied(call, k, prompt):  # half "A", half "B": a group has an advantage unless neither is right
        return f"<think>{call}</think><answer>{'A' if k % 2 else 'B'}</answer>"

    monkeypatch.setattr(trainer, "rollout", ScriptedPolicy(trainer.run_parts, varied))
    monkeypatch.setattr(trainer.run_parts, "it", iter(trainer.run_parts.pipeline))
    before = jax.device_get(trainer.state.train.params)
    trainer.sft_iteration(0)
    after_sft = jax.device_get(trainer.state.train.params)
    check(moves(before, after_sft), 1e-3)
    trainer.state.begin_grpo()
    out = trainer.grpo_iteration(1)
    assert out["grad_norm"] > 0 and out["invalid_gradient_ratio"] < 1.0
    check(moves(after_sft, jax.device_get(trainer.state.train.params)), 1e-5)


@pytest.mark.parametrize("rollout_batch_size", [0, 2])
@pytest.mark.parametrize("rescued_prompt", ["variant", "original"])
def test_accuracy_signal_rescues_all_wrong_groups_and_trains_on_the_chosen_prompt(
        trainer, monkeypatch, rescued_prompt, rollout_batch_size):
    """GDQA on accuracy (issue 23): the first rollouts answer a class no question has (formatted, all
    wrong): every group is re-rolled; the re-rolls name the answer on even rows, so every group's
    accuracy varies after (rescued). With rescued_prompt "original" the update's rows carry the
    query's own prompt (the first rollout's) and their rewards are scored against it; with "variant"
    the prompts the re-roll sampled with. One rollout call per step (rollout_batch_size 0: calls 0
    and 1 = rollout and re-roll) or one per micro-batch of 2 groups (calls 0, 1 and re-rolls 2, 3)."""
    calls = 1 if rollout_batch_size == 0 else 2
    records = []

    def answer(call, k, prompt):
        right = call >= calls and k % 2 == 0
        text = records[(call % calls) * (4 // calls) + k // G].answer_text if right else "Spleen"
        return f"<think>{call}</think><answer>{text}</answer>"

    steps = Steps(trainer, answer, **{
        "gdqa.trigger": "online", "gdqa.kinds": ("rephrase",), "gdqa.num_variants": 2,
        "gdqa.signal": "accuracy", "gdqa.rescued_prompt": rescued_prompt,
        "rl.rollout_batch_size": rollout_batch_size})
    policy = steps.policy
    records_seen = steps.records
    records = records_seen
    batches, out = steps.collect(3)
    assert len(policy.prompts) == 2 * calls  # the rollouts, then their re-rolls
    assert out["gdqa/rerolled/all_wrong"] == 4.0 and out["gdqa/rescued/all_wrong"] == 4.0
    assert out["gdqa/rescued_groups"] == 4.0 and out["gdqa/accuracy_varies_after"] == 4.0
    assert out["accuracy_invalid_ratio"] == 0.0
    first, rerolled = sum(policy.prompts[:calls], []), sum(policy.prompts[calls:], [])
    for i, b in enumerate(batches):
        prompts, texts, rewards, s = _rows(trainer, b)
        sampled = rerolled if rescued_prompt == "variant" else first
        assert prompts == sampled[i * 2 * G:(i + 1) * 2 * G]
        assert s == (1 if rescued_prompt == "original" else 2)
        np.testing.assert_array_equal(rewards, [2.0 if k % 2 == 0 else 1.0 for k in range(len(texts))])
    if rescued_prompt == "variant":
        assert any(len(set(rerolled[p * G:(p + 1) * G])) > 1 for p in range(4))  # variants were used


def test_the_trainers_rollout_runs_at_the_cut_prompt_width(trainer, monkeypatch):
    """A GRPO step's rollout through the trainer's compiled program: its prompts arrive cut to the
    smallest of rl.prompt_buckets = 12 widths of data.prompt_length (96: 8, 16, ..., 96) holding the
    step's longest prompt, and the collector still trains on the full-width prompts."""
    r = trainer.run_parts
    assert r.prompt_widths == tuple(range(8, 97, 8))
    widths, compiled = [], r.rollout

    def recording(params, frozen, batch, *args):
        widths.append(batch.input_ids.shape[1])
        return compiled(params, frozen, batch, *args)

    monkeypatch.setattr(r, "rollout", recording)
    steps = Steps(trainer, answer_a)
    queries = next(steps.it)
    batches, _ = steps.collector.collect(queries, steps.it.unreadable, trainer.rollout, steps.gdqa,
                                         jax.random.key(0), np.random.default_rng(0))
    mask = np.concatenate([np.asarray(b.prompt.attention_mask) for b in batches])
    want = next(w for w in r.prompt_widths if w >= mask.sum(1).max())
    assert widths == [want] and want < 96, (widths, mask.sum(1).max())
    assert mask.shape[1] == 96  # the update's prompts keep data.prompt_length
