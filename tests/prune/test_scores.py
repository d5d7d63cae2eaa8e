"""Block scores, allocation scopes and the least-squares refit, on small synthetic matrices."""

import pytest
import torch

from bitsmith.prune import scores as S


def test_block_scores_are_output_energy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g)
    norm = torch.rand(12, generator=g) + 0.1
    s = S.block_scores(w, (4, 3), norm)
    assert s.shape == (2, 4)
    manual = ((w * norm) ** 2)[4:8, 3:6].sum()
    assert torch.allclose(s[1, 1], manual)
    assert torch.allclose(S.block_scores(w, (4, 3)).sum(), (w**2).sum())


def test_layer_and_row_allocation_counts():
    g = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(6, 10, generator=g), "b": torch.rand(3, 4, generator=g)}
    layer = S.allocate(scores, 0.3, "layer")
    assert int((~layer["a"]).sum()) == 18 and int((~layer["b"]).sum()) == 4
    # the pruned blocks are the lowest-scored ones
    a = scores["a"]
    assert a[~layer["a"]].max() <= a[layer["a"]].min()
    row = S.allocate(scores, 0.3, "row")
    assert ((~row["a"]).sum(dim=1) == 3).all() and ((~row["b"]).sum(dim=1) == 1).all()


def test_global_allocation_hits_target_within_bounds():
    g = torch.Generator().manual_seed(2)
    # layer "small" has tiny scores: without bounds a global threshold would empty it first
    scores = {"big": torch.rand(20, 20, generator=g) + 1.0, "small": torch.rand(10, 10, generator=g) * 1e-3,
              "mid": torch.rand(16, 16, generator=g)}
    total = sum(s.numel() for s in scores.values())
    masks = S.allocate(scores, 0.5, "global", min_sparsity=0.2, max_sparsity=0.7, normalize=False)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert abs(pruned - 0.5 * total) <= 1
    for n, m in masks.items():
        assert 0.2 - 1e-9 <= S.sparsity_of(m) <= 0.7 + 1e-9, n
    assert S.sparsity_of(masks["small"]) == pytest.approx(0.7)  # clamped at the max, not emptied
    # normalization removes the per-layer scale: equal score shapes then get near-equal sparsity
    normed = S.allocate({"x": scores["mid"] * 1e3, "y": scores["mid"]}, 0.5, "global")
    assert S.sparsity_of(normed["x"]) == pytest.approx(S.sparsity_of(normed["y"]), abs=0.01)


def _correlated_inputs(T, K, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, K // 2, generator=g)
    mix = torch.randn(K // 2, K, generator=g)
    return base @ mix + 0.3 * torch.randn(T, K, generator=g)


@pytest.mark.parametrize("sparsity,block", [(0.5, (2, 4)), (0.25, (1, 4)), (0.75, (1, 4)), (0.25, (4, 1))])
def test_refit_is_the_least_squares_solution_and_keeps_zeros(sparsity, block):
    """Both forms (S-form for sparse rows, OBS P-form for dense rows) give the per-row least-squares solution."""
    K, N = 16, 8
    X = _correlated_inputs(200, K, seed=3)
    gram = X.t() @ X
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    keep = S.allocate({"w": S.block_scores(w, block)}, sparsity, "layer")["w"]
    masked = w * S.expand(keep, block)
    new = S.refit_rows(w, keep, block, gram, ridge=0.0)
    assert bool((new[masked == 0] == 0).all())  # pruned positions stay exactly zero
    # each row: the kept weights minimize ||X (w' - w)|| (compare with lstsq on the kept columns)
    for n in range(N):
        cols = S.expand(keep, block)[n]
        sol = torch.linalg.lstsq(X[:, cols].double(), (X @ w[n]).double().unsqueeze(1)).solution.squeeze(1)
        if cols.any():
            assert torch.allclose(new[n, cols].double(), sol, atol=1e-3, rtol=1e-3)
    assert S.output_error(new, w, gram) < S.output_error(masked, w, gram)


def test_activation_scores_beat_magnitude_on_output_error():
    """Inputs with very uneven column norms: scoring by |W| * ||X_j|| loses less output than |W| alone."""
    K, N, block = 64, 32, (1, 4)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(500, K, generator=g) * torch.logspace(-1, 1, K)[torch.randperm(K, generator=g)]
    gram = X.t() @ X
    w = torch.randn(N, K, generator=g)
    norm = (X**2).sum(0).sqrt()
    for sparsity in (0.3, 0.5, 0.7):
        mag = S.allocate({"w": S.block_scores(w, block)}, sparsity, "layer")["w"]
        act = S.allocate({"w": S.block_scores(w, block, norm)}, sparsity, "layer")["w"]
        e_mag = S.output_error(w * S.expand(mag, block), w, gram)
        e_act = S.output_error(w * S.expand(act, block), w, gram)
        assert e_act < e_mag


def test_conjugate_gradient_refit_reaches_the_exact_error():
    K, N, block = 32, 12, (1, 4)
    X = _correlated_inputs(300, K, seed=6) * torch.logspace(-1, 1, K)
    gram = X.t() @ X
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(7))
    keep = S.allocate({"w": S.block_scores(w, block)}, 0.5, "layer")["w"]
    exact = S.refit_rows(w, keep, block, gram, ridge=0.01)
    cg = S.refit_rows(w, keep, block, gram, ridge=0.01, iters=40)
    assert bool((cg[~S.expand(keep, block)] == 0).all())
    e_mask = S.output_error(w * S.expand(keep, block), w, gram)
    e_exact, e_cg = S.output_error(exact, w, gram), S.output_error(cg, w, gram)
    assert e_exact < e_mask and e_cg < e_exact * 1.01 + 1e-6
