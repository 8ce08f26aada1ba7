"""Task sampling invariants: one user per task, D^C ⊆ D^T, scoring only D^T \\ D^C, reproducibility."""

import numpy as np
import pytest
import torch

from steerable.data import PreferenceData, TaskSampler, simulate, step_population
from steerable.errors import DataError


def row_of(data, vec_c, vec_r):
    """Rows of ``data`` whose chosen/rejected equal the given vectors."""
    return set(np.flatnonzero((data.chosen == vec_c).all(1) & (data.rejected == vec_r).all(1)))


def test_context_is_subset_of_targets_and_scoring_excludes_it(step_data):
    _, train, _ = step_data
    sampler = TaskSampler(train, 0, 10, 20, batch_size=16, seed=0)
    for nc in (0, 3, 10):
        batch = sampler.sample(num_context=nc)
        assert batch.context_chosen.shape == (16, nc, 1)
        torch.testing.assert_close(batch.context_chosen, batch.target_chosen[:, :nc])
        torch.testing.assert_close(batch.context_rejected, batch.target_rejected[:, :nc])
        assert batch.target_in_context[:, :nc].all() and not batch.target_in_context[:, nc:].any()
        assert not (batch.scored_mask & batch.target_in_context).any()
        assert batch.scored_mask.sum(1).eq(20 - nc).all()


def test_each_task_holds_distinct_pairs_of_one_user(step_data):
    _, train, _ = step_data
    sampler = TaskSampler(train, 0, 10, 20, batch_size=8, seed=1)
    batch = sampler.sample(num_context=5)
    for i in range(8):
        user = int(batch.user_index[i])
        rows = set()
        for j in range(20):
            found = row_of(train, batch.target_chosen[i, j].numpy(), batch.target_rejected[i, j].numpy())
            assert found, "target pair not in the data"
            assert found & set(train.rows_by_user[user]), "target pair belongs to another user"
            rows |= found & set(train.rows_by_user[user])
        assert len(rows) == 20  # drawn without replacement
        assert int(batch.hidden_mode[i]) == train.user_mode[user]


def test_same_seed_same_batches_and_global_rng_untouched(step_data):
    _, train, _ = step_data
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [TaskSampler(train, seed=5).sample() for _ in range(1)]
    b = [TaskSampler(train, seed=5).sample() for _ in range(1)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.testing.assert_close(a[0].target_chosen, b[0].target_chosen)
    c = TaskSampler(train, seed=6).sample()
    assert not torch.equal(a[0].target_chosen, c.target_chosen)


def test_context_size_is_uniform_over_the_range(step_data):
    _, train, _ = step_data
    sampler = TaskSampler(train, 2, 5, 12, batch_size=2, seed=0)
    sizes = [sampler.sample().num_context for _ in range(400)]
    assert set(sizes) == {2, 3, 4, 5}
    counts = np.bincount(sizes)[2:]
    assert counts.min() > 70  # ~100 each


def test_users_with_fewer_pairs_than_targets_are_padded_and_masked():
    data = PreferenceData(
        user_ids=np.array(["a"] * 3 + ["b"] * 30, dtype=object),
        chosen=np.arange(33, dtype=np.float32)[:, None],
        rejected=-np.arange(33, dtype=np.float32)[:, None],
    )
    sampler = TaskSampler(data, 0, 2, 20, batch_size=64, seed=0)
    batch = sampler.sample(num_context=2)
    small = batch.user_index == 0
    assert small.any() and (~small).any()
    assert batch.target_mask[small].sum(1).eq(3).all()
    assert batch.scored_mask[small].sum(1).eq(1).all()
    assert batch.target_mask[~small].all()
    # with 3 context pairs, user "a" (3 pairs, nothing left to score) is never drawn
    assert (TaskSampler(data, 0, 3, 20, seed=0).sample(num_context=3).user_index == 1).all()


def test_no_user_with_enough_pairs_is_a_clear_error():
    data = simulate(step_population(), 5, 4, seed=0)
    with pytest.raises(
        DataError, match=r"no user has enough pairs to form a task.*the most any user has is 4"
    ):
        TaskSampler(data, 0, 10, 20)


def test_fixed_tasks_cover_users_evenly_and_share_targets_across_sizes(step_data):
    _, _, val = step_data
    sampler = TaskSampler(val, 0, 4, 12, seed=0)
    tasks = sampler.fixed_tasks([0, 4], num_tasks=80, batch_size=32)
    users = torch.cat([b.user_index for b in tasks[0]])
    assert len(users) == 80 and np.bincount(users.numpy()).max() == 2  # 40 users, twice each
    a, b = tasks[0][0], tasks[4][0]
    torch.testing.assert_close(a.target_chosen, b.target_chosen)  # common random numbers
