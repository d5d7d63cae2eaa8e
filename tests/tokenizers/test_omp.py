"""Batched OMP: exact recovery, agreement with a plain one-target-at-a-time OMP, early stop, the screened search."""

import pytest
import torch

from bitsmith.tokenizers import omp_native
from bitsmith.tokenizers.omp import omp, refresh_steps

native = pytest.mark.skipif(not omp_native.available(), reason="no C compiler for the native CPU steps")


def _sparse_problem(seed=0, n=300, d=96, m=40, s=5):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))  # unequal norms
    support = torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(m)])
    coefs = torch.randn(m, s, generator=g).sign() * (0.5 + torch.rand(m, s, generator=g))
    targets = torch.einsum("ms,msd->md", coefs, atoms[support])
    return atoms, targets, support, coefs


@pytest.mark.parametrize("candidates,use_native", [(None, False), (128, False), pytest.param(128, True, marks=native)])
def test_exact_combinations_are_recovered(candidates, use_native):
    atoms, targets, support, coefs = _sparse_problem()
    res = omp(atoms, targets, 8, candidates=candidates, batch_size=16, device="cpu", use_native=use_native)
    for i in range(len(targets)):
        used = res.coefs[i] != 0
        assert int(used.sum()) == support.shape[1]  # stops once the target is reached: no extra atoms
        got = dict(zip(res.indices[i][used].tolist(), res.coefs[i][used].tolist()))
        want = dict(zip(support[i].tolist(), coefs[i].tolist()))
        assert got.keys() == want.keys()
        assert all(abs(got[j] - want[j]) < 1e-4 for j in want)
    assert float(res.residual.max()) < 1e-5
    assert torch.allclose(res.combine(atoms), targets, atol=1e-4)


def _reference_omp(atoms, y, k):
    """Textbook OMP for one target, in float64: normalised correlation, least squares by lstsq."""
    A, y = atoms.double(), y.double()
    norms = A.norm(dim=1)
    chosen, r = [], y.clone()
    for _ in range(k):
        score = (A @ r).abs() / norms
        score[chosen] = -1
        chosen.append(int(score.argmax()))
        x = torch.linalg.lstsq(A[chosen].T, y.unsqueeze(1)).solution.squeeze(1)
        r = y - A[chosen].T @ x
    return chosen, x


def test_matches_reference_on_dense_targets():
    g = torch.Generator().manual_seed(3)
    atoms, targets = torch.randn(200, 32, generator=g), torch.randn(24, 32, generator=g)
    res = omp(atoms, targets, 10, candidates=None, batch_size=7, device="cpu")
    for i in range(len(targets)):
        chosen, x = _reference_omp(atoms, targets[i], 10)
        assert res.indices[i].tolist() == chosen
        assert torch.allclose(res.coefs[i].double(), x, atol=1e-4)


def test_batching_does_not_change_results():
    atoms, targets, _, _ = _sparse_problem(seed=5, m=33)
    targets = targets + 0.3 * torch.randn_like(targets)
    a = omp(atoms, targets, 12, candidates=None, batch_size=33, device="cpu")
    b = omp(atoms, targets, 12, candidates=None, batch_size=4, device="cpu")
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.coefs, b.coefs, atol=1e-5)


def test_screened_search_is_close_to_exact():
    g = torch.Generator().manual_seed(7)
    atoms, targets = torch.randn(500, 64, generator=g), torch.randn(30, 64, generator=g)
    exact = omp(atoms, targets, 16, candidates=None, device="cpu")
    screened = omp(atoms, targets, 16, candidates=100, device="cpu")
    assert float(screened.residual.mean()) <= 1.02 * float(exact.residual.mean())
    # the chosen atoms are used exactly: the residual reported is the one of the coefficients returned
    direct = (targets - screened.combine(atoms)).norm(dim=1) / targets.norm(dim=1)
    assert torch.allclose(direct, screened.residual, atol=1e-5)


def test_edge_cases():
    atoms = torch.eye(4)
    res = omp(atoms, torch.zeros(2, 4), 3, device="cpu")  # zero targets: all coefficients 0
    assert torch.equal(res.coefs, torch.zeros(2, 3)) and torch.equal(res.residual, torch.zeros(2))
    res = omp(atoms, torch.ones(1, 4), 10, device="cpu")  # k larger than the dictionary is capped
    assert res.indices.shape == (1, 4) and float(res.residual[0]) < 1e-6
    dup = torch.cat([atoms, atoms[:1]])  # a duplicate atom is never used twice
    res = omp(dup, torch.tensor([[1.0, 2.0, 0.0, 0.0]]), 3, device="cpu")
    assert torch.allclose(res.combine(dup), torch.tensor([[1.0, 2.0, 0.0, 0.0]]), atol=1e-6)
    assert sorted(refresh_steps(64)) == [0, 2, 6, 14, 30, 62]
    with pytest.raises(ValueError):
        omp(atoms, torch.ones(1, 3), 2, device="cpu")


@native
def test_native_steps_match_the_torch_steps():
    """The C steps and the batched torch steps pick the same atoms (no near-ties in random data) with the same
    coefficients, including targets that stop early, dependent atoms and batches not divisible by the chunk."""
    g = torch.Generator().manual_seed(11)
    atoms = torch.randn(700, 48, generator=g) * (0.5 + torch.rand(700, 1, generator=g))
    atoms[5] = atoms[3] * 2  # a dependent pair
    targets = torch.randn(45, 48, generator=g)
    targets[:4] = atoms[[3, 7, 9, 11]][:, :] @ torch.eye(48)  # single atoms: stop after one step
    targets[4] = 0.0
    a = omp(atoms, targets, 20, candidates=40, batch_size=37, device="cpu", use_native=True)
    b = omp(atoms, targets, 20, candidates=40, batch_size=37, device="cpu", use_native=False)
    used = b.coefs != 0
    assert torch.equal(a.coefs != 0, used)
    assert torch.equal(a.indices[used], b.indices[used])
    assert torch.allclose(a.coefs, b.coefs, atol=1e-5)
    assert torch.allclose(a.residual, b.residual, atol=1e-6)
    assert int(used[:4].sum()) == 4 and float(a.residual[:4].max()) < 1e-5


def test_native_steps_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(omp_native, "_state", {})
    monkeypatch.setenv("BITSMITH_OMP_NATIVE", "0")
    assert not omp_native.available()
    atoms, targets, _, _ = _sparse_problem(seed=2, m=6)
    res = omp(atoms, targets, 8, candidates=64, device="cpu")  # the torch steps
    assert float(res.residual.max()) < 1e-5
