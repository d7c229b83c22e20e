"""Calibration: fit eq. 5 to a model's information flow under a retention budget (paper eqs. 6-7, SLSQP).

    schedule = fit_schedule(report.inf, report.num_layers, retention=0.4)    # a core Schedule

Pure numpy (and scipy for SLSQP, imported on first use); nothing from transformers.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from adatoken.core.schedule import MIN_KEEP, Schedule, check_first_layer, exponential_curve, lowest_retention

#
# In eq. 5, alpha and the center L enter only through the amplitude alpha·exp(beta·L), because
# alpha·exp(-beta·(i - L)) = exp(a - beta·i) with a = ln(alpha) + beta·L. The loss is flat along that
# line, so no fit can tell alpha from L. The optimiser therefore works on (a, beta, M), which a curve
# does determine, and the paper's bounds alpha ∈ [0.5, 1.2], L ∈ [0, n-1] become the condition that
# some alpha and L in range give this a: the bound a >= ln 0.5 and the constraint a - beta·(n-1) <= ln 1.2,
# linear in (a, beta).
# A fit is reported as the (alpha, L) pair with alpha as close to a reference as those bounds allow
# (default 0.8, the paper's default alpha), so `exponential_curve` redraws it.

ALPHA_BOUNDS = (0.5, 1.2)  # the paper's empirical range for alpha
# beta > 0 keeps the curve decaying, hence the schedule non-increasing. Above 5 a layer keeps under
# e^-5 < 1 % of the previous layer's excess over the floor, a step already; the cap also keeps exp finite.
BETA_BOUNDS = (1e-3, 5.0)
# The fit targets min-max normalised INF in [0, 1], so a floor (the curve's asymptote) above 1 means
# "keep everything" and is never needed. A negative floor lets the curve cross zero at a finite depth,
# so the clipped schedule drops every spatial token from there on, which small budgets need.
FLOOR_BOUNDS = (-1.0, 1.0)
# The curve's value at layer 0 is at most e^30 + M. Fits to values in [0, 1] never come near it; it
# keeps the squared loss finite when SLSQP's line search tries a huge amplitude with a steep decay.
MAX_LOG_AMPLITUDE = 30.0
# Width of the smooth clip used in the budget constraint during the SLSQP fit (see fit_schedule).
SOFT_CLIP_WIDTH = 0.01
# An INF whose span across layers is under this share of its largest value is "nearly flat": eq. 6 stretches
# whatever wiggles it has to [0, 1], and the fit then follows measurement noise (fit_schedule warns).
FLAT_INF_SPAN = 0.1


@dataclass(frozen=True)
class CurveFit:
    """Eq.-5 parameters fitted to a per-layer curve, and the eq.-7 loss they reach."""

    alpha: float
    beta: float
    center: float
    floor: float
    loss: float

    def curve(self, num_layers: int) -> np.ndarray:
        return exponential_curve(num_layers, self.alpha, self.beta, self.center, self.floor)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "center": self.center, "floor": self.floor, "loss": self.loss}


def normalize_inf(inf) -> np.ndarray:
    """Eq. 6: min-max normalise a per-layer information-flow curve to [0, 1]."""
    inf = _per_layer_curve(inf, "inf")
    span = inf.max() - inf.min()
    if span <= 0:
        raise ValueError(f"inf is constant ({inf[0]}) across layers: it says nothing about where to prune")
    return (inf - inf.min()) / span


def fit_curve(values, smooth_lambda: float = 1.0, alpha: float = 0.8) -> CurveFit:
    """Fit eq. 5 to `values` (one per layer, used as given) by minimising eq. 7 with SLSQP, no budget.

    Eq. 7: sum_i (O(i) - v(i))^2 + smooth_lambda * sum_i (dO(i) - dv(i))^2, with d the first difference.
    `alpha` is the reference that picks (alpha, center) among the equivalent pairs (module comment above).
    """
    values = _per_layer_curve(values, "values")
    _check_fit_options(smooth_lambda, alpha)
    # ftol is absolute on the loss: 1e-14 lets a noise-free curve's loss go to ~0, so its parameters
    # come back to ~1e-5 or better even where a slow decay over few layers is nearly a straight line.
    theta = _slsqp_eq7(_initial_guess(values, smooth_lambda), values, smooth_lambda, extra_constraints=[],
                       ftol=1e-14).x
    return _curve_fit(theta, len(values), alpha, _eq7(theta, values, smooth_lambda)[0])


def fit_schedule(inf, num_layers: int, retention: float | None = None, smooth_lambda: float = 1.0,
                 first_layer: int = 2, alpha: float = 0.8, *, final_keep: float | None = None,
                 min_keep: float = MIN_KEEP) -> Schedule:
    """AdaToken-3D's schedule: eq. 5 fitted to normalised INF under a budget (paper § III-C).

    keep(i) = 1 for i < first_layer, else clip(O(i), min_keep, 1), where O minimises eq. 7 against
    normalise(inf) subject to the budget. O decays, so keep is non-increasing. min_keep (default 1 %)
    keeps every layer from being emptied; 0 allows it.

    The budget is `retention` (mean(keep) == retention, our cross-method axis) or `final_keep` (the last
    layer keeps that fraction, as the authors' fit pins its curve at a % of the last layer,
    junkerman2004/Adatoken-3D llava/eval/ATE_inference.py:109-114). For final_keep the shape is fitted
    without a budget and its floor M moved so that O(last) == final_keep exactly.

    The budget is on the clipped schedule, whose mean has kinks wherever O crosses 0 or 1 and is flat
    in the parameters once O is clipped at every free layer; SLSQP's linearised constraint copes badly
    with both. So the fit runs in three steps:
      1. fit the shape without the budget (`fit_curve`): a warm start near the eq.-7 optimum;
      2. SLSQP on eq. 7 with the budget written on a smooth clip (softplus edges of width
         SOFT_CLIP_WIDTH w): differentiable everywhere, and within w·ln 2 ≈ 0.007 of the hard clip
         at each layer, so it settles the trade-off between shape and budget (steeper decay, lower
         floor, ...) where eq. 7 wants it;
      3. make the budget exact on the real, hard-clipped schedule by moving the floor M alone:
         mean(keep) is continuous and non-decreasing in M, so bisection hits the requested retention
         to float precision; the shift is of the order of the smooth clip's error (under 0.01 on
         realistic curves, recorded as meta["floor_shift"]).
    Feasible retentions are [first_layer / num_layers, 1]: the first layers keep everything. At those
    two ends the smooth clip, never exactly 0 or 1, cannot meet the budget: SLSQP reports a failure
    (kept in meta["slsqp"]) and step 3 alone produces the schedule, which is then trivial anyway.
    """
    num_layers = int(num_layers)
    if (retention is None) == (final_keep is None):
        raise ValueError("fit_schedule takes one budget: retention or final_keep")
    target = normalize_inf(inf)
    if len(target) != num_layers:
        raise ValueError(f"inf has {len(target)} values but num_layers is {num_layers}: give one INF value per layer")
    check_first_layer(first_layer, num_layers)
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep}")
    _warn_if_flat(inf)
    shape = fit_curve(target, smooth_lambda, alpha)
    if final_keep is not None:
        return _endpoint_fit(shape, target, num_layers, final_keep, smooth_lambda, first_layer, alpha, min_keep)
    lowest = lowest_retention(num_layers, first_layer, min_keep)
    if not lowest - 1e-12 <= retention <= 1.0:
        raise ValueError(
            f"retention {retention} is infeasible: with first_layer={first_layer} of {num_layers} layers keeping "
            f"everything and the rest at least min_keep={min_keep}, feasible retentions are [{lowest:.4f}, 1]; "
            f"lower first_layer or min_keep to go below {lowest:.4f}"
        )
    retention = max(float(retention), lowest)
    free = slice(first_layer, None)

    def soft_budget(theta):  # the smooth clip to [min_keep, 1]
        x, w = _curve_and_jacobian(theta, num_layers)[0][free], SOFT_CLIP_WIDTH
        soft = min_keep + w * (np.logaddexp(0.0, (x - min_keep) / w) - np.logaddexp(0.0, (x - 1.0) / w))
        return (first_layer + soft.sum()) / num_layers - retention

    def soft_budget_jac(theta):
        curve, basis = _curve_and_jacobian(theta, num_layers)
        x, w = curve[free], SOFT_CLIP_WIDTH
        slope = _sigmoid((x - min_keep) / w) - _sigmoid((x - 1.0) / w)
        return slope @ basis[free] / num_layers

    budget = {"type": "eq", "fun": soft_budget, "jac": soft_budget_jac}
    # ftol 1e-10, not fit_curve's 1e-14: this loss stays O(1), and asking for more than it can resolve
    # in float64 only makes SLSQP run to its iteration limit.
    result = _slsqp_eq7(_theta(shape), target, smooth_lambda, extra_constraints=[budget], ftol=1e-10)

    theta = result.x.copy()
    floor_before = theta[2]
    theta[2] = _floor_for_budget(theta, num_layers, first_layer, retention, min_keep)
    keep = _clipped_schedule(theta, num_layers, first_layer, min_keep)
    curve = _curve_and_jacobian(theta, num_layers)[0]
    fit = _curve_fit(theta, num_layers, alpha, _eq7(theta, target, smooth_lambda)[0])
    meta = {
        "method": "adatoken3d-fit", **fit.to_dict(),
        "rms_residual": float(np.sqrt(np.mean((curve - target) ** 2))),
        "first_layer": first_layer, "smooth_lambda": smooth_lambda, "alpha_reference": alpha, "min_keep": min_keep,
        "requested_retention": retention,
        "floor_shift": float(theta[2] - floor_before),
        "slsqp": {"success": bool(result.success), "message": str(result.message), "iterations": int(result.nit)},
        "shape_fit": shape.to_dict(),
        "inf_norm": target.tolist(),
    }
    return Schedule(keep=keep.tolist(), meta=meta)


def _endpoint_fit(shape: CurveFit, target: np.ndarray, num_layers: int, final_keep: float, smooth_lambda: float,
                  first_layer: int, alpha: float, min_keep: float) -> Schedule:
    if not 0.0 < final_keep <= 1.0:
        raise ValueError(f"final_keep must be in (0, 1], got {final_keep}")
    theta = _theta(shape)
    theta[2] = final_keep - math.exp(theta[0] - theta[1] * (num_layers - 1))
    keep = _clipped_schedule(theta, num_layers, first_layer, min(min_keep, final_keep))
    keep[-1] = min(keep[-2], final_keep)  # exact, not up to rounding (inf has at least 2 layers)
    curve = _curve_and_jacobian(theta, num_layers)[0]
    fit = _curve_fit(theta, num_layers, alpha, _eq7(theta, target, smooth_lambda)[0])
    meta = {"method": "adatoken3d-fit", **fit.to_dict(),
            "rms_residual": float(np.sqrt(np.mean((curve - target) ** 2))),
            "first_layer": first_layer, "smooth_lambda": smooth_lambda, "alpha_reference": alpha, "min_keep": min_keep,
            "requested_final_keep": final_keep, "floor_shift": float(theta[2] - shape.floor),
            "shape_fit": shape.to_dict(), "inf_norm": target.tolist()}
    return Schedule(keep=keep.tolist(), meta=meta)


def _warn_if_flat(inf) -> None:
    values = np.asarray(inf, dtype=np.float64)
    top = np.abs(values).max()
    if top > 0 and (values.max() - values.min()) < FLAT_INF_SPAN * top:
        warnings.warn(
            f"the information flow is nearly flat: it spans {(values.max() - values.min()) / top:.1%} of its largest "
            f"value across layers (under {FLAT_INF_SPAN:.0%}), and eq. 6 stretches that to [0, 1], so the fitted "
            "curve follows measurement noise rather than a trend. Measure it on more samples (adatoken analyze "
            "--num-samples), or prune with a fixed budget curve instead of this fit.", UserWarning, stacklevel=3)


def _per_layer_curve(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or len(array) < 2:
        raise ValueError(f"{name} must be a 1-D sequence with one value per layer (at least 2), "
                         f"got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; it has NaN or inf at layers "
                         f"{np.flatnonzero(~np.isfinite(array)).tolist()}")
    return array


def _check_fit_options(smooth_lambda: float, alpha: float) -> None:
    if not smooth_lambda >= 0:
        raise ValueError(f"smooth_lambda must be >= 0, got {smooth_lambda}")
    if not ALPHA_BOUNDS[0] <= alpha <= ALPHA_BOUNDS[1]:
        raise ValueError(f"alpha must be in {list(ALPHA_BOUNDS)} (the paper's range), got {alpha}")


def _curve_and_jacobian(theta, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """O(i) = exp(a - beta·i) + M for theta = (a, beta, M), and dO/dtheta as a [num_layers, 3] matrix."""
    a, beta, floor = theta
    i = np.arange(num_layers, dtype=np.float64)
    decay = np.exp(a - beta * i)
    return decay + floor, np.stack([decay, -i * decay, np.ones(num_layers)], axis=1)


def _eq7(theta, target: np.ndarray, smooth_lambda: float) -> tuple[float, np.ndarray]:
    """Eq. 7 and its gradient in theta."""
    curve, basis = _curve_and_jacobian(theta, len(target))
    residual = curve - target
    slope_residual = np.diff(residual)
    loss = residual @ residual + smooth_lambda * (slope_residual @ slope_residual)
    grad = 2.0 * residual @ basis + 2.0 * smooth_lambda * slope_residual @ np.diff(basis, axis=0)
    return float(loss), grad


def _slsqp_eq7(theta0: np.ndarray, target: np.ndarray, smooth_lambda: float, extra_constraints: list, ftol: float):
    # scipy.optimize costs half a second to import; only calibration needs it, not `import adatoken`.
    from scipy.optimize import minimize

    last = len(target) - 1
    # with the bound a >= ln 0.5: some alpha in ALPHA_BOUNDS and center in [0, last] give this a
    amplitude = {"type": "ineq", "fun": lambda t: math.log(ALPHA_BOUNDS[1]) + t[1] * last - t[0],
                 "jac": lambda t: np.array([-1.0, float(last), 0.0])}
    bounds = [(math.log(ALPHA_BOUNDS[0]), MAX_LOG_AMPLITUDE), BETA_BOUNDS, FLOOR_BOUNDS]
    return minimize(_eq7, theta0, args=(target, smooth_lambda), jac=True, method="SLSQP", bounds=bounds,
                    constraints=[amplitude, *extra_constraints], options={"ftol": ftol, "maxiter": 500})


def _initial_guess(target: np.ndarray, smooth_lambda: float) -> np.ndarray:
    """Best grid point in beta, with amplitude and floor solved by linear least squares at each.

    Exponential fits have local minima in beta; for fixed beta eq. 7 is quadratic in (A, M) with
    O = A·exp(-beta·i) + M, so a 1-D grid plus a 2x2 solve lands SLSQP in the right basin.
    """
    n = len(target)
    i = np.arange(n, dtype=np.float64)
    rows_y = np.concatenate([target, math.sqrt(smooth_lambda) * np.diff(target)])
    best_loss, best = math.inf, None
    for beta in np.geomspace(*BETA_BOUNDS, num=80):
        decay = np.exp(-beta * i)
        rows_x = np.concatenate([np.stack([decay, np.ones(n)], axis=1),
                                 math.sqrt(smooth_lambda) * np.stack([np.diff(decay), np.zeros(n - 1)], axis=1)])
        (amplitude, floor), *_ = np.linalg.lstsq(rows_x, rows_y, rcond=None)
        highest = math.log(ALPHA_BOUNDS[1]) + beta * (n - 1)
        amplitude = np.clip(amplitude, ALPHA_BOUNDS[0], math.exp(min(highest, MAX_LOG_AMPLITUDE)))
        theta = np.array([math.log(amplitude), beta, np.clip(floor, *FLOOR_BOUNDS)])
        loss = _eq7(theta, target, smooth_lambda)[0]
        if loss < best_loss:
            best_loss, best = loss, theta
    return best


def _theta(fit: CurveFit) -> np.ndarray:
    return np.array([math.log(fit.alpha) + fit.beta * fit.center, fit.beta, fit.floor])


def _curve_fit(theta, num_layers: int, alpha_reference: float, loss: float) -> CurveFit:
    a, beta, floor = (float(t) for t in theta)
    # alpha = exp(a - beta·L) for L in [0, num_layers - 1]; take the feasible alpha nearest the reference
    lowest = max(ALPHA_BOUNDS[0], math.exp(a - beta * (num_layers - 1)))
    highest = min(ALPHA_BOUNDS[1], math.exp(a))
    alpha = min(max(alpha_reference, lowest), highest)
    center = min(max((a - math.log(alpha)) / beta, 0.0), num_layers - 1.0)  # in range up to rounding
    return CurveFit(alpha=alpha, beta=beta, center=center, floor=floor, loss=loss)


def _clipped_schedule(theta, num_layers: int, first_layer: int, min_keep: float) -> np.ndarray:
    keep = np.clip(_curve_and_jacobian(theta, num_layers)[0], min_keep, 1.0)
    keep[:first_layer] = 1.0
    return keep


def _floor_for_budget(theta, num_layers: int, first_layer: int, retention: float, min_keep: float) -> float:
    """The floor M in FLOOR_BOUNDS at which the hard-clipped schedule's mean equals `retention`."""

    def mean_keep(floor: float) -> float:
        return float(_clipped_schedule((theta[0], theta[1], floor), num_layers, first_layer, min_keep).mean())

    lo, hi = FLOOR_BOUNDS
    if mean_keep(lo) > retention:  # mean_keep(hi) == 1 always: exp(...) + 1 > 1 everywhere
        raise RuntimeError(
            f"fit_schedule could not meet retention {retention}: the SLSQP fit (log-amplitude {theta[0]:.4g}, "
            f"beta {theta[1]:.4g}) keeps {mean_keep(lo):.4f} even at the lowest floor {lo}"
        )
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_keep(mid) < retention else (lo, mid)
    return hi


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))
