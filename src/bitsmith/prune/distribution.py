"""Generalized-Gaussian (GG) analysis of weights: moment-matching fits, CDF/quantiles, goodness of fit, inspection.

GG(mu, nu, beta) has density nu / (2 beta Gamma(1/nu)) * exp(-(|x - mu| / beta)^nu): nu = 2 is a Gaussian, nu = 1 a
Laplace, smaller nu is peakier with heavier tails. Fit by moment matching (the DeepShape paper's estimator):

    mu = mean,  rho = E[(x - mu)^2] / E[|x - mu|]^2,  solve rho = Gamma(1/nu) Gamma(3/nu) / Gamma(2/nu)^2 for nu,
    beta = sqrt(Gamma(1/nu) / Gamma(3/nu)) * std.

rho decreases monotonically in nu (rho(1) = 2, rho(2) = pi/2, rho -> 4/3 as nu -> inf), so nu is
found by bisection on [NU_MIN, NU_MAX]; a rho outside that range clamps nu and sets `clamped`.

|x - mu| / beta raised to nu is Gamma(1/nu, 1)-distributed, so the CDF and the quantile function reduce to the
regularized incomplete gamma function (`torch.special.gammainc`, on any device) and its inverse (`gamma_inv`:
table start and Newton steps, in float64).

Pooled fits (a layer type, a DeepShape group) pool the moments of the weights centred on their own tensor's mean, so
one streaming read of each tensor suffices: `Moments` adds up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

NU_MIN, NU_MAX = 0.05, 10.0
_CHUNK = 1 << 24  # elements per float64 chunk when summing moments (bounded temporary memory)


# ------------------------------------------------------------------------------------------------------------ fits

def gg_rho(nu: float) -> float:
    """Gamma(1/nu) Gamma(3/nu) / Gamma(2/nu)^2: E[x^2] / E[|x|]^2 of a centred GG with shape nu."""
    return math.exp(math.lgamma(1 / nu) + math.lgamma(3 / nu) - 2 * math.lgamma(2 / nu))


def solve_shape(rho: float) -> tuple[float, bool]:
    """(nu, clamped): the shape whose moment ratio is rho, by bisection on log nu over [NU_MIN, NU_MAX]."""
    if not math.isfinite(rho):
        return NU_MIN, True
    if rho >= gg_rho(NU_MIN):
        return NU_MIN, True
    if rho <= gg_rho(NU_MAX):
        return NU_MAX, True
    lo, hi = math.log(NU_MIN), math.log(NU_MAX)
    for _ in range(80):  # rho decreases in nu
        mid = 0.5 * (lo + hi)
        if gg_rho(math.exp(mid)) > rho:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi)), False


def beta_from_std(nu: float, std: float) -> float:
    return math.sqrt(math.exp(math.lgamma(1 / nu) - math.lgamma(3 / nu))) * std


def std_from_beta(nu: float, beta: float) -> float:
    return beta * math.sqrt(math.exp(math.lgamma(3 / nu) - math.lgamma(1 / nu)))


@dataclass
class Moments:
    """Sums over weights centred on their own tensor's mean: count, sum of (x - m)^2 and of |x - m|, sum of x."""

    n: int = 0
    s1: float = 0.0  # sum x
    s2c: float = 0.0  # sum (x - m_t)^2
    sac: float = 0.0  # sum |x - m_t|

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s1 + other.s1, self.s2c + other.s2c, self.sac + other.sac)

    @property
    def mean(self) -> float:
        return self.s1 / self.n if self.n else 0.0


def tensor_moments(t: torch.Tensor, skip_zeros: bool = False) -> Moments:
    """Exact moments of one tensor (float64 sums over chunks; two passes: the mean, then the centred sums)."""
    x = t.detach().reshape(-1)
    if skip_zeros:
        x = x[x != 0]
    n = x.numel()
    if n == 0:
        return Moments()
    s1 = sum(float(c.double().sum()) for c in x.split(_CHUNK))
    m = s1 / n
    s2 = sa = 0.0
    for c in x.split(_CHUNK):
        d = c.double() - m
        s2 += float((d * d).sum())
        sa += float(d.abs().sum())
    return Moments(n, s1, s2, sa)


@dataclass
class GGFit:
    mu: float
    nu: float
    beta: float
    std: float
    n: int
    clamped: bool = False
    extra: dict = field(default_factory=dict)  # goodness of fit and notes

    def as_dict(self) -> dict:
        d = {"mu": self.mu, "nu": self.nu, "beta": self.beta, "std": self.std, "n": self.n}
        if self.clamped:
            d["clamped"] = True
        d.update(self.extra)
        return d


def fit_moments(m: Moments) -> GGFit | None:
    """The GG fit of pooled moments; None when the weights have no spread (constant or empty)."""
    if m.n < 2 or m.sac <= 0 or m.s2c <= 0:
        return None
    var = m.s2c / m.n
    mabs = m.sac / m.n
    rho = var / (mabs * mabs)
    nu, clamped = solve_shape(rho)
    std = math.sqrt(var)
    return GGFit(m.mean, nu, beta_from_std(nu, std), std, m.n, clamped)


def fit_gg(t: torch.Tensor, skip_zeros: bool = False) -> GGFit | None:
    return fit_moments(tensor_moments(t, skip_zeros))


# ------------------------------------------------------------------------------------------- CDF and quantiles

def gg_cdf(x: torch.Tensor, mu: float, nu: float, beta: float) -> torch.Tensor:
    """P(X <= x) for X ~ GG(mu, nu, beta), float64."""
    d = x.double() - mu
    a = torch.tensor(1.0 / nu, dtype=torch.float64, device=x.device)
    p = torch.special.gammainc(a, (d.abs() / beta) ** nu)
    return 0.5 + 0.5 * torch.sign(d) * p


def gg_pdf(x: torch.Tensor, mu: float, nu: float, beta: float) -> torch.Tensor:
    d = (x.double() - mu).abs() / beta
    return torch.exp(-(d**nu) - math.lgamma(1 / nu)) * nu / (2 * beta)


def gamma_inv(a: float, lower: torch.Tensor, upper: torch.Tensor, newton: int = 3) -> torch.Tensor:
    """z with P(a, z) = lower (= 1 - upper): the regularized lower incomplete gamma inverted, float64.

    Both tails are given so that each is accurate (lower near 0 is the centre, upper near 0 the far tail). Start:
    log-log interpolation in a table of 4096 points; then Newton steps on whichever tail is the smaller.
    """
    dev = lower.device
    lower = lower.double()
    upper = upper.double()
    at = torch.tensor(a, dtype=torch.float64, device=dev)
    lga = math.lgamma(a)
    # table: z from deep in the centre to beyond where the upper tail is ~1e-300
    z_hi = max(50.0, 2 * a + 40.0)
    while float(torch.special.gammaincc(at, torch.tensor(z_hi, dtype=torch.float64, device=dev))) > 1e-250:
        z_hi *= 1.5
    zt = torch.logspace(-40, math.log10(z_hi), 4096, dtype=torch.float64, device=dev)
    pt = torch.special.gammainc(at, zt)
    qt = torch.special.gammaincc(at, zt)
    use_lower = lower <= 0.5
    tiny = 1e-300
    out = torch.empty_like(lower)
    # centre half: log z against log P (increasing); tail half: log z against -log Q (increasing)
    lp = torch.log(pt.clamp_min(tiny))
    lq = -torch.log(qt.clamp_min(tiny))
    lz = torch.log(zt)
    out = torch.where(use_lower, _interp(torch.log(lower.clamp_min(tiny)), lp, lz),
                      _interp(-torch.log(upper.clamp_min(tiny)), lq, lz)).exp()
    for _ in range(newton):
        z = out.clamp_min(1e-300)
        logdens = (a - 1) * torch.log(z) - z - lga
        dens = torch.exp(logdens)
        f = torch.where(use_lower, torch.special.gammainc(at, z) - lower,
                        upper - torch.special.gammaincc(at, z))
        step = torch.where(dens > 0, f / dens.clamp_min(1e-300), torch.zeros_like(f))
        out = (z - step).clamp(z * 0.25, z * 4.0)
    out = torch.where(lower <= 0, torch.zeros_like(out), out)
    return out


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation (xp increasing, possibly with flat runs), clamped at the ends."""
    xp, keep = _strictly_increasing(xp)
    fp = fp[keep]
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return f0 + w * (f1 - f0)


def _strictly_increasing(xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.ones_like(xp, dtype=torch.bool)
    keep[1:] = xp[1:] > torch.cummax(xp, 0).values[:-1]
    return xp[keep], keep


def gg_quantile_from_ranks(c2: torch.Tensor, n: int, mu: float, nu: float, beta: float) -> torch.Tensor:
    """GG quantiles at p = c2 / (2n) (c2: twice the mid-rank count, int64 or float64), float64, exact in both tails."""
    c2 = c2.double()
    dev = abs(c2 - n)  # |2p - 1| * n
    lower = dev / n
    upper = (n - dev) / n
    z = gamma_inv(1.0 / nu, lower, upper)
    return mu + torch.sign(c2 - n) * beta * z ** (1.0 / nu)


# ------------------------------------------------------------------------------------------------ goodness of fit

def ks_distance(t: torch.Tensor, fit: GGFit, *, gaussian: bool = False, skip_zeros: bool = False) -> float:
    """Kolmogorov-Smirnov distance between the weights' empirical CDF and the fitted GG (or, with `gaussian`, the
    normal with the same mean and std)."""
    x = t.detach().reshape(-1)
    if skip_zeros:
        x = x[x != 0]
    vals, counts = torch.unique(x, sorted=True, return_counts=True)
    n = int(counts.sum())
    hi = torch.cumsum(counts, 0).double() / n  # ECDF just after each value
    lo = hi - counts.double() / n  # just before
    if gaussian:
        f = 0.5 * (1 + torch.erf((vals.double() - fit.mu) / (fit.std * math.sqrt(2))))
    else:
        f = gg_cdf(vals, fit.mu, fit.nu, fit.beta)
    return float(torch.maximum((hi - f).abs(), (lo - f).abs()).max())


# ------------------------------------------------------------------------------------------------ layer types

_INDEX = re.compile(r"\.\d+\.")


def layer_type(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `mlp.down_proj` (module path without the container and index)."""
    base = name[: -len(".weight")] if name.endswith(".weight") else name
    m = _INDEX.search(base)
    if m:
        return base[m.end():]
    return base.rsplit(".", 1)[-1] if "." in base else base


def group_key(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `model.layers.*.mlp.down_proj.weight` (the name, indexes starred)."""
    return re.sub(r"\.\d+\.", ".*.", name)


# ----------------------------------------------------------------------------------------------- inspection

def inspect_distribution(model_path: str | Path, plot: str | Path | None = None, *, max_plots: int = 12) -> dict:
    """GG fits of every floating 2-D weight of a checkpoint, one tensor at a time, per tensor and per layer type.

    Returns {"path", "tensors": [{name, type, shape, mu, nu, beta, std, n, ks, ks_gauss}], "types": {type: fit},
    "table": str}; with `plot`, also writes a PNG of histograms (log y) with the fitted GG of representative layers.
    """
    from ..compress.checkpoint import CheckpointReader

    reader = CheckpointReader(model_path)
    names = sorted((n for n, i in reader.tensors.items() if len(i.shape) == 2 and i.dtype.is_floating_point
                    and n.endswith(".weight")), key=lambda n: (reader.tensors[n].file, _natural(n)))
    rows: list[dict] = []
    by_type: dict[str, Moments] = {}
    hists: dict[str, dict] = {}
    wanted = set(_representatives(names, max_plots)) if plot is not None else set()
    for name in names:
        t = reader.get(name)
        m = tensor_moments(t)
        fit = fit_moments(m)
        kind = layer_type(name)
        row = {"name": name, "type": kind, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        if fit is None:
            row["note"] = "constant"
        else:
            row.update({k: v for k, v in fit.as_dict().items()})
            row["ks"] = ks_distance(t, fit)
            row["ks_gauss"] = ks_distance(t, fit, gaussian=True)
            by_type[kind] = by_type.get(kind, Moments()) + m
            if name in wanted:
                hists[name] = _histogram(t, fit)
        rows.append(row)
        del t
    types = {}
    for kind, m in sorted(by_type.items()):
        fit = fit_moments(m)
        if fit is not None:
            types[kind] = {**fit.as_dict(), "tensors": sum(1 for r in rows if r["type"] == kind and "nu" in r)}
    info = {"path": str(reader.path), "tensors": rows, "types": types}
    info["table"] = render_distribution_table(info)
    if plot is not None:
        plot_histograms(hists, Path(plot), title=Path(str(reader.path)).name)
        info["plot"] = str(plot)
    return info


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _representatives(names: list[str], k: int) -> list[str]:
    """Up to k tensors: for each layer type, its first, middle and last layer (types with one tensor: that one)."""
    by_type: dict[str, list[str]] = {}
    for n in names:
        by_type.setdefault(layer_type(n), []).append(n)
    multi = [(t, v) for t, v in by_type.items() if len(v) > 1]
    single = [(t, v) for t, v in by_type.items() if len(v) == 1]
    chosen: list[str] = []
    # one mid-depth tensor of every repeated type first, then first/last layers, then singletons (embeddings)
    for _, v in multi:
        chosen.append(v[len(v) // 2])
    for _, v in single:
        chosen.append(v[0])
    for _, v in multi:
        chosen.extend([v[0], v[-1]])
    seen, out = set(), []
    for n in chosen:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out[:k]


def _histogram(t: torch.Tensor, fit: GGFit, bins: int = 161) -> dict:
    """Density histogram over mu +- 8 std (wide enough to show the tails), and the fitted GG and Gaussian there."""
    x = t.detach().reshape(-1).float()
    lim = 8 * fit.std
    lo, hi = fit.mu - lim, fit.mu + lim
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    centres = torch.linspace(lo + width / 2, hi - width / 2, bins)
    dens = counts / (x.numel() * width)
    grid = torch.linspace(lo, hi, 401)
    outside = float(((x < lo) | (x > hi)).double().mean())
    return {"centres": centres.tolist(), "density": dens.tolist(), "grid": grid.tolist(),
            "gg": gg_pdf(grid, fit.mu, fit.nu, fit.beta).tolist(),
            "gauss": (torch.exp(-0.5 * ((grid.double() - fit.mu) / fit.std) ** 2)
                      / (fit.std * math.sqrt(2 * math.pi))).tolist(),
            "nu": fit.nu, "beta": fit.beta, "std": fit.std, "outside": outside, "n": x.numel()}


def plot_histograms(hists: dict[str, dict], out: Path, title: str = "") -> None:
    """A grid of histograms (log y) with the fitted GG (solid) and the Gaussian of the same std (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, len(hists))
    cols = min(4, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        c = torch.tensor(h["centres"])
        d = torch.tensor(h["density"])
        width = float(c[1] - c[0]) if len(c) > 1 else 1.0
        ax.bar(c.tolist(), d.tolist(), width=width, color="#9ab", edgecolor="none", label="weights")
        ax.plot(h["grid"], h["gg"], color="#c33", lw=1.2, label="GG fit")
        ax.plot(h["grid"], h["gauss"], color="#333", lw=0.8, ls="--", label="Gaussian")
        ax.set_yscale("log")
        pos = d[d > 0]
        floor = float(pos.min()) * 0.5 if pos.numel() else 1e-3
        ax.set_ylim(floor, float(max(d.max(), max(h["gg"]))) * 2)
        ax.set_title(_short(name), fontsize=8)
        ax.text(0.02, 0.97, f"nu={h['nu']:.2f}\nstd={h['std']:.3g}", transform=ax.transAxes, fontsize=7, va="top")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(hists):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=7, ncol=3)
    if title:
        fig.suptitle(f"{title}: weight histograms (log density) with the moment-matched GG fit", fontsize=9,
                     x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def _short(name: str) -> str:
    n = name[: -len(".weight")] if name.endswith(".weight") else name
    return n.replace("model.layers.", "L").replace("model.", "")


def render_distribution_table(info: dict) -> str:
    lines = [f"{info['path']}: generalized-Gaussian fits (moment matching) of {len(info['tensors'])} weights"]
    lines.append("")
    lines.append("per layer type (weights centred on their tensor's mean, pooled):")
    h = f"{'type':<28} {'tensors':>7} {'nu':>6} {'beta':>10} {'std':>10}"
    lines += [h, "-" * len(h)]
    for kind, f in info["types"].items():
        lines.append(f"{kind:<28} {f['tensors']:>7} {f['nu']:>6.3f} {f['beta']:>10.4g} {f['std']:>10.4g}")
    lines.append("")
    lines.append("per tensor (ks: Kolmogorov-Smirnov distance to the GG fit; ks_gauss: to a Gaussian of the same std):")
    h = f"{'tensor':<48} {'shape':>12} {'mu':>10} {'nu':>6} {'beta':>10} {'ks':>7} {'ks_gauss':>8}"
    lines += [h, "-" * len(h)]
    for r in info["tensors"]:
        shape = "x".join(str(d) for d in r["shape"])
        if "nu" not in r:
            lines.append(f"{_short(r['name']):<48} {shape:>12} {r.get('note', '')}")
            continue
        flag = "*" if r.get("clamped") else ""
        lines.append(f"{_short(r['name']):<48} {shape:>12} {r['mu']:>10.2e} {r['nu']:>6.3f}{flag} {r['beta']:>10.4g}"
                     f" {r['ks']:>7.4f} {r['ks_gauss']:>8.4f}")
    return "\n".join(lines)
