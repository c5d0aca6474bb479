"""Statistical assertions with tolerances derived from standard errors.

Every check is a two-sample test of equal means with a family-wise false-alarm
probability ALPHA (Bonferroni over the d coordinates for the elementwise check;
chi-square over all coordinates for the joint check). With fixed seeds the tests
are deterministic; ALPHA says how unlucky a seed would have to be.
"""

import torch
from scipy import stats

ALPHA = 1e-4


def flat_grads(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise z of mean(a) − mean(b) for samples a (N, d), b (M, d) (or b a known mean (d,))."""
    a = a.double()
    var = a.var(0) / a.shape[0]
    if b.dim() == 2:
        b = b.double()
        var = var + b.var(0) / b.shape[0]
        b = b.mean(0)
    return (a.mean(0) - b.double()) / var.clamp_min(1e-300).sqrt()


def means_equal(a, b, alpha=ALPHA):
    """(ok, report): elementwise |z| below the Bonferroni bound and Σz² below the χ² bound."""
    z = z_scores(a, b)
    d = z.numel()
    z_max = stats.norm.ppf(1 - alpha / (2 * d))
    chi2_max = stats.chi2.ppf(1 - alpha, d)
    zmax, chi2 = z.abs().max().item(), (z**2).sum().item()
    ok = zmax < z_max and chi2 < chi2_max
    return ok, f"max|z| = {zmax:.2f} (bound {z_max:.2f}), Σz² = {chi2:.1f} (bound {chi2_max:.1f}, d = {d})"


def assert_means_equal(a, b, alpha=ALPHA):
    ok, report = means_equal(a, b, alpha)
    assert ok, report
    return report
