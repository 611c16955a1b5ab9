"""The batched small-basis fine-tune against a plain one-episode reference."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from negmargin.config import EvalConfig
from negmargin.episodes import sample_episodes
from negmargin.errors import DataError
from negmargin.finetune import (
    FinetuneConfig,
    compute_grams,
    episode_randomness,
    finetune,
    fit_heads,
    query_scores,
    step_positions,
)
from negmargin.meta_test import MetaTestResult, paired_difference, run_episodes, run_meta_test
from negmargin.testing import reference_episode


@pytest.mark.parametrize(("dim", "shot"), [(1600, 1), (1600, 5), (640, 1), (640, 5)])
def test_batched_engine_matches_reference(dim, shot):
    torch.manual_seed(dim + shot)
    E, K, q = 6, 5, 75
    s, steps = FinetuneConfig(), (150 if shot == 1 else 600)
    n = K * shot
    feats = torch.relu(torch.randn(E, n + q, dim))
    support, query = feats[:, :n], feats[:, n:]
    labels = torch.arange(K).repeat_interleave(shot).expand(E, n)
    init, orders = episode_randomness(torch.arange(E), K, dim, n, s, steps)
    grams = compute_grams(support, init, query)
    head = finetune(grams, labels, orders, s, steps)
    weights = head.weights(support, init).float()
    preds = query_scores(grams, head).argmax(-1)
    for e in range(E):
        ref_w, ref_pred = reference_episode(support[e], labels[e], query[e], init[e], orders[e], s, steps)
        assert (ref_w - weights[e]).abs().max().item() <= 1e-4
        assert torch.equal(ref_pred, preds[e])
        assert (ref_w - init[e]).abs().max() > 1e-3  # the head really moved


def test_uneven_shots_match_reference():
    torch.manual_seed(7)
    s, steps = FinetuneConfig(), 200
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0, 2])
    support, query = torch.randn(9, 64), torch.randn(12, 64)
    init, orders = episode_randomness([3], 3, 64, 9, s, steps)
    grams = compute_grams(support[None], init, query[None])
    head = finetune(grams, labels[None], orders, s, steps)
    ref_w, ref_pred = reference_episode(support, labels, query, init[0], orders[0], s, steps)
    assert (ref_w - head.weights(support[None], init)[0].float()).abs().max() <= 1e-4
    assert torch.equal(ref_pred, query_scores(grams, head)[0].argmax(-1))


def test_scores_from_a_table_equal_scores_of_the_gathered_queries():
    """The meta-test's path (queries as rows of one normalised table, never gathered) and the
    plain one (an (E, q, D) query tensor) give the same cosines; 40 episodes cross a query block."""
    torch.manual_seed(3)
    table = torch.nn.functional.normalize(torch.relu(torch.randn(300, 64)), dim=-1)
    E, K, shot, q = 40, 5, 1, 15
    index = torch.randint(0, 300, (E, K * (shot + q)))
    support, queries = table[index[:, : K * shot]], index[:, K * shot :]
    labels = torch.arange(K).repeat_interleave(shot).expand(E, K * shot)
    heads = fit_heads(support, labels, K, torch.arange(E), FinetuneConfig(), 150, normalized=True)
    from_table = heads.scores_from(table, queries)
    gathered = heads.scores(table[queries])
    assert from_table.shape == (E, K * q, K)
    assert torch.allclose(from_table, gathered, rtol=0, atol=1e-12)
    assert torch.equal(from_table.argmax(-1), gathered.argmax(-1))


def test_batch_orders_keep_the_last_partial_batch_and_reshuffle():
    s = FinetuneConfig()
    _, orders = episode_randomness([0], 5, 8, 5, s, 150)  # 1-shot: batches of 4 then 1
    sizes = [step_positions(orders, t, 4).shape[1] for t in range(6)]
    assert sizes == [4, 1, 4, 1, 4, 1]
    assert orders.shape[1] == 75 and all(sorted(row.tolist()) == list(range(5)) for row in orders[0])
    assert len({tuple(r.tolist()) for r in orders[0]}) > 10  # reshuffled every pass
    _, orders5 = episode_randomness([0], 5, 8, 25, FinetuneConfig(), 600)
    assert [step_positions(orders5, t, 4).shape[1] for t in range(7)] == [4] * 6 + [1]


def test_init_is_kaiming_uniform_and_per_episode():
    s = FinetuneConfig()
    a, _ = episode_randomness([0, 1, 2], 5, 1600, 5, s, 150)
    b, _ = episode_randomness([2, 0], 5, 1600, 5, s, 150)
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert a.abs().max() <= 1 / 40 and a.abs().max() > 0.99 / 40  # uniform(±1/√1600)


def test_episodes_are_fixed_and_well_formed():
    labels = np.repeat(np.arange(12), 20)
    ep = sample_episodes(labels, 5, 1, 15, 50, seed=0)
    assert ep.shape == (50, 5, 16)
    assert torch.equal(ep, sample_episodes(labels, 5, 1, 15, 50, seed=0))
    assert not torch.equal(ep, sample_episodes(labels, 5, 1, 15, 50, seed=1))
    for e in ep:
        classes = labels[e.numpy()]
        assert (classes == classes[:, :1]).all()  # one class per way
        assert len(set(classes[:, 0])) == 5  # five different classes
        assert all(len(set(row.tolist())) == 16 for row in e)  # without replacement
    # Fixed values: the same episodes on every machine (PCG64 stream).
    assert ep[0, 0, :3].tolist() == sample_episodes(labels, 5, 1, 15, 1, seed=0)[0, 0, :3].tolist()


def test_too_few_images_or_classes_reported_before_drawing():
    labels = np.array([0] * 20 + [1] * 20 + [2] * 10)
    with pytest.raises(DataError, match=r"n_way=5 but the split has only 3 classes"):
        sample_episodes(labels, 5, 1, 15, 10)
    with pytest.raises(DataError, match=r"fewer than n_shot \+ n_query = 16 images: c \(10\)"):
        sample_episodes(labels, 3, 1, 15, 10, class_names=["a", "b", "c"])


def test_chunking_and_splitting_do_not_change_results():
    torch.manual_seed(0)
    labels = np.repeat(np.arange(10), 25)
    feats = torch.randn(len(labels), 32) + torch.randn(10, 32).repeat_interleave(25, 0)
    ep = sample_episodes(labels, 5, 1, 15, 40, seed=0)
    s = FinetuneConfig()
    full = run_episodes(feats, ep, torch.arange(40), 1, replace(s, chunk_size=40), 60)
    chunked = run_episodes(feats, ep, torch.arange(40), 1, replace(s, chunk_size=7), 60)
    odd = run_episodes(feats, ep[1::2], torch.arange(40)[1::2], 1, replace(s, chunk_size=5), 60)
    assert np.array_equal(full, chunked) and np.array_equal(full[1::2], odd)
    assert full.mean() > 50  # clustered features are easy


def test_ci_is_1_96_std_over_sqrt_n():
    acc = np.array([60.0, 80.0, 100.0, 40.0])
    r = MetaTestResult(acc, 5, 1, 15, 150)
    assert r.mean == 70.0 and r.ci95 == pytest.approx(1.96 * np.std(acc) / 2)


def test_paired_difference_cancels_what_the_episodes_share():
    # hand-computed: differences 10, 0, 20, -10 -> mean 5, std 11.18, n 4
    delta, ci = paired_difference(np.array([70.0, 80, 100, 40]), np.array([60.0, 80, 80, 50]))
    assert delta == 5.0 and ci == pytest.approx(1.96 * np.std([10, 0, 20, -10]) / 2)
    # 2000 episodes whose difficulty varies a lot; model a is 1.5 points better on each
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(20, 90, 2000)
    a = difficulty + 1.5 + rng.normal(0, 3, 2000)
    b = difficulty + rng.normal(0, 3, 2000)
    ra, rb = MetaTestResult(a, 5, 1, 15, 150), MetaTestResult(b, 5, 1, 15, 150)
    assert abs(ra.mean - rb.mean) < ra.ci95 + rb.ci95  # the separate CIs overlap ...
    delta, ci = paired_difference(a, b)
    assert delta - ci > 0 and abs(delta - 1.5) < ci  # ... the paired one finds the difference
    assert ci < ra.ci95 / 4
    with pytest.raises(ValueError, match=r"same items.*\(2000,\) and \(1999,\)"):
        paired_difference(a, b[:-1])


def test_meta_test_api_end_to_end():
    torch.manual_seed(0)
    labels = np.repeat(np.arange(8), 20)
    feats = torch.randn(len(labels), 64) * 0.5 + torch.randn(8, 64).repeat_interleave(20, 0)
    res = run_meta_test(
        feats, labels, EvalConfig(n_episodes=30, n_query=10), FinetuneConfig(), progress=False
    )
    assert res.steps == 150 and len(res.accuracies) == 30 and res.mean > 80
    five = run_meta_test(
        feats, labels, EvalConfig(n_episodes=30, n_query=10, n_shot=5), FinetuneConfig(), progress=False
    )
    assert five.steps == 600 and five.mean >= res.mean - 1
