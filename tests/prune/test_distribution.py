"""Generalized-Gaussian fits, CDF/quantiles and the `inspect --distribution` report."""

from __future__ import annotations

import math

import pytest
import torch

from bitsmith.prune import distribution as D
from tests.prune.test_deepshape import gg_sample


@pytest.mark.parametrize("nu", [0.3, 0.8, 1.0, 2.0, 3.0])
def test_shape_solver_inverts_the_moment_ratio(nu):
    got, clamped = D.solve_shape(D.gg_rho(nu))
    assert got == pytest.approx(nu, rel=1e-6) and not clamped


def test_known_ratios_and_clamping():
    assert D.gg_rho(1.0) == pytest.approx(2.0)
    assert D.gg_rho(2.0) == pytest.approx(math.pi / 2)
    assert D.solve_shape(1.2) == (D.NU_MAX, True)  # below 4/3: flatter than uniform
    assert D.solve_shape(1e9) == (D.NU_MIN, True)


@pytest.mark.parametrize("nu,beta", [(0.7, 0.01), (1.0, 1.0), (2.0, 0.02)])
def test_fit_recovers_sampled_parameters(nu, beta):
    x = gg_sample(150_000, nu, beta, seed=7) + 0.5
    fit = D.fit_gg(x)
    assert fit.mu == pytest.approx(0.5, abs=5 * fit.std / math.sqrt(fit.n))
    assert fit.nu == pytest.approx(nu, rel=0.05)
    assert fit.beta == pytest.approx(beta, rel=0.05)
    assert D.ks_distance(x, fit) < 0.006
    if nu != 2.0:
        assert D.ks_distance(x, fit, gaussian=True) > 3 * D.ks_distance(x, fit)


def test_moments_pool_and_skip_zeros():
    a, b = torch.randn(1000), torch.randn(3000) * 2
    pooled = D.tensor_moments(a) + D.tensor_moments(b)
    assert pooled.n == 4000
    assert pooled.s2c == pytest.approx(float(((a - a.mean()) ** 2).sum() + ((b - b.mean()) ** 2).sum()), rel=1e-5)
    z = torch.cat([a, torch.zeros(500)])
    assert D.tensor_moments(z, skip_zeros=True).n == 1000
    assert D.fit_gg(torch.ones(5)) is None


@pytest.mark.parametrize("nu", [0.3, 1.0, 2.5])
def test_quantiles_invert_the_cdf_in_both_tails(nu):
    n = 10**8
    c2 = torch.tensor([1, 3, 1001, n - 5, n, n + 1, 2 * n - 1001, 2 * n - 1], dtype=torch.float64)
    q = D.gg_quantile_from_ranks(c2, n, 0.1, nu, 2.0)
    p = c2 / (2 * n)
    f = D.gg_cdf(q, 0.1, nu, 2.0)
    assert bool((q[1:] > q[:-1]).all())
    assert q[4] == pytest.approx(0.1)
    tail = torch.minimum(p, 1 - p)
    assert float(((f - p).abs() / tail).max()) < 1e-6


def test_gg_pdf_agrees_with_the_cdf():
    x = torch.linspace(-40, 40, 400_001, dtype=torch.float64)
    for nu in (0.5, 1.0, 2.0):
        area = float(torch.trapezoid(D.gg_pdf(x, 0.0, nu, 1.0), x))
        inside = float(D.gg_cdf(x[-1:], 0.0, nu, 1.0) - D.gg_cdf(x[:1], 0.0, nu, 1.0))
        assert area == pytest.approx(inside, abs=1e-4)
        assert inside > 0.98


def test_inspect_distribution_table_and_plot(tiny_lm, tmp_path):
    png = tmp_path / "d.png"
    info = D.inspect_distribution(tiny_lm, plot=png)
    names = [r["name"] for r in info["tensors"]]
    assert "model.layers.1.mlp.down_proj.weight" in names and "model.embed_tokens.weight" in names
    assert all(".norm" not in n and "layernorm" not in n for n in names)  # 1-D weights are not tabled
    assert set(info["types"]) >= {"mlp.down_proj", "self_attn.q_proj", "embed_tokens"}
    assert info["types"]["mlp.down_proj"]["tensors"] == 2
    row = next(r for r in info["tensors"] if r["name"] == "model.layers.0.mlp.up_proj.weight")
    assert 1.5 < row["nu"] < 2.5  # the tiny model is initialised from a normal distribution
    assert "mlp.down_proj" in info["table"] and "ks_gauss" in info["table"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inspect_distribution(tiny_lm, tmp_path):
    import json

    from click.testing import CliRunner

    from bitsmith.cli import main

    res = CliRunner().invoke(main, ["inspect", str(tiny_lm), "--distribution", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["types"]["mlp.up_proj"]["nu"] > 0
