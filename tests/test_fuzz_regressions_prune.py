"""Regression of the fuzzer (tests/test_fuzz.py): prune's least-squares refit chose different ridges
in the two frontends (parity of refit_chosen).

Fuzz example (prune:ratio=0.3,target=stream,importance=l2,seed=2 on a post-norm token chain and an
image CNN chain, LayerNorm eps 0): a reader's pruned input was the same vector on all 6 rows of one
calibration fold. ONNX Runtime gave the rows bit for bit equal; torch one float32 ulp apart. Ridge
1e-6 fit the target's real variation to that rounding (weights moved by ~0.02 in torch only), and
its held-out error came out 1.2e-3 ||Y||^2 lower in torch (43.930 vs 44.051; every other candidate
agreed to ~1e-7 ||Y||^2): torch chose ridge 1e-6, ONNX ridge 0.001, and the readers downstream
followed. No tie band below the real differences (1e-5..1e-2 ||Y||^2) absorbs that, so the refit
leaves out directions in which the features vary only by float32 rounding (`_Fit.resolved`)."""

from __future__ import annotations

import numpy as np

from passes.prune import RIDGES, _Fit


def _fit(z: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: bool = True) -> _Fit:
    fit = _Fit(
        reader=None,
        weight=weight,
        kept=[0, 1, 2],
        layout=(0, 1),
        window=None,
        bias=object() if bias else None,
        slot=0,
    )
    fit.add(x, z, "least_squares", 0)
    return fit


def _rows():
    rng = np.random.default_rng(0)
    # The pruned input: one row repeated (what a 3-channel eps-0 LayerNorm gave on every token).
    row = np.array([1.4707, -0.3684, -1.0929], dtype=np.float32)
    exact = np.repeat(row[None], 6, axis=0)
    ulp = exact.copy()  # the same rows as torch computed them: some one ulp apart
    flips = rng.integers(-1, 2, size=ulp.shape)
    ulp = np.where(flips > 0, np.nextafter(ulp, np.float32(np.inf)), ulp)
    ulp = np.where(flips < 0, np.nextafter(ulp, np.float32(-np.inf)), ulp)
    x = rng.standard_normal((6, 4)).astype(np.float32)  # the original model's input varies
    weight = rng.standard_normal((4, 5))
    return exact.astype(np.float64), ulp.astype(np.float64), x.astype(np.float64), weight


def test_rows_equal_up_to_rounding_fit_like_rows_equal_bit_for_bit():
    exact, ulp, x, weight = _rows()
    assert not np.array_equal(exact, ulp) and np.abs(exact - ulp).max() < 2e-7
    for bias in (True, False):
        a, b = _fit(exact, x, weight, bias), _fit(ulp, x, weight, bias)
        found_a, found_b = a.candidates(a.folds[0]), b.candidates(b.folds[0])
        for ridge in RIDGES:
            name = f"ridge {ridge:g}"
            np.testing.assert_allclose(found_b[name], found_a[name], atol=1e-5, err_msg=f"{name} bias={bias}")
        if bias:  # one row repeated: weights stay, the intercept takes the mean residual
            np.testing.assert_allclose(found_b["ridge 1e-06"][:3], weight[:3], atol=1e-5)
            np.testing.assert_allclose(found_b["ridge 1e-06"], found_b["bias"], atol=1e-5)


def test_features_that_vary_still_fit():
    """Directions that vary measurably are fit as before: a full-rank fold takes the plain solve."""
    rng = np.random.default_rng(1)
    z = rng.standard_normal((40, 3))
    x = np.hstack([z, rng.standard_normal((40, 1))])
    weight = rng.standard_normal((4, 5))
    fit = _fit(z, x, weight)
    assert fit.resolved(fit.folds[0]) is None
    theta = fit.candidates(fit.folds[0])["ridge 1e-06"]
    design = np.hstack([z, np.ones((40, 1))])
    best, *_ = np.linalg.lstsq(design, x @ weight, rcond=None)
    np.testing.assert_allclose(theta, best, atol=1e-4)
    # one feature varies only by 1e-3 of its size: still resolved (float32 resolves 1e-7)
    z[:, 2] = 5.0 + 1e-3 * rng.standard_normal(40)
    fit = _fit(z, np.hstack([z, x[:, 3:]]), weight)
    assert fit.resolved(fit.folds[0]) is None
