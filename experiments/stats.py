"""Statistics over arms x items x seeds: bootstrap intervals, paired arm tests, agreement.

Items are the unit of generalisation: seeds of one item are correlated (same question, same
model), so intervals resample items (clusters) with all their seeds, and arms are compared on
the same (item, seed) pairs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

LEVELS = ("nominal", "ordinal", "interval", "ratio")
_MAX_MATRIX_CELLS = 2_000_000  # bound memory of vectorised iid resamples


# ======================================================================= bootstrap


def bootstrap_ci(
    values, stat: Callable = np.mean, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0, clusters=None
) -> tuple[float, float, float]:
    """Percentile bootstrap: (estimate on all data, low, high) at level 1 - alpha.

    With `clusters` (one id per value, e.g. the item), whole clusters are resampled with
    replacement, keeping all seeds of an item together; otherwise values are resampled iid.
    Missing values (None/NaN) are dropped first, with their cluster ids. Deterministic for a
    fixed `seed`.
    """
    x = _as_float_array(values)
    keep = ~np.isnan(x)
    if clusters is not None:
        clusters = list(clusters)
        if len(clusters) != len(x):
            raise ValueError(f"clusters has {len(clusters)} entries for {len(x)} values")
        clusters = [c for c, k in zip(clusters, keep) if k]
    x = x[keep]
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one non-missing value")
    rng = np.random.default_rng(seed)
    if clusters is None:
        boots = _iid_boot(x, stat, n_boot, rng)
    else:
        boots = _cluster_boot(x, pd.factorize(pd.Series(clusters, dtype=object))[0], stat, n_boot, rng)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(stat(x)), float(low), float(high)


def _iid_boot(x: np.ndarray, stat: Callable, n_boot: int, rng) -> np.ndarray:
    n = x.size
    rows = max(1, _MAX_MATRIX_CELLS // n)
    out = []
    for start in range(0, n_boot, rows):
        samples = x[rng.integers(0, n, size=(min(rows, n_boot - start), n))]
        try:
            out.append(np.asarray(stat(samples, axis=1), dtype=float))
        except TypeError:  # a stat without an axis argument
            out.append(np.array([stat(s) for s in samples], dtype=float))
    return np.concatenate(out)


def _cluster_boot(x: np.ndarray, codes: np.ndarray, stat: Callable, n_boot: int, rng) -> np.ndarray:
    k = int(codes.max()) + 1
    picks = rng.integers(0, k, size=(n_boot, k))
    if stat is np.mean:  # exact shortcut: mean of the concatenation = summed sums / summed counts
        sums = np.bincount(codes, weights=x, minlength=k)
        counts = np.bincount(codes, minlength=k).astype(float)
        return sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    groups = [x[codes == j] for j in range(k)]
    return np.array([stat(np.concatenate([groups[j] for j in row])) for row in picks], dtype=float)


def _as_float_array(values) -> np.ndarray:
    return np.array([np.nan if _missing(v) else float(v) for v in values], dtype=float)


def _missing(v: Any) -> bool:
    return v is None or (not isinstance(v, (str, bytes)) and bool(pd.isna(v)))


# ======================================================================= paired arm tests


def paired_test(
    a,
    b,
    pairs=None,
    *,
    binary: Optional[bool] = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    cluster_on_item: bool = True,
) -> dict:
    """Compare arm a with arm b over the same (item, seed) pairs.

    `a`, `b`: mappings (dict / pandas Series) from pair key to outcome, with `pairs` the keys
    to use (default: the keys of `a` also in `b`); or sequences aligned with `pairs`. Pairs
    missing or None/NaN in either arm are dropped (`n_dropped`). Binary outcomes (all 0/1,
    or `binary=True`) get an exact McNemar test (two-sided binomial test on the discordant
    pairs); continuous ones a Wilcoxon signed-rank test. `ci` is a bootstrap interval of
    mean(a - b); when keys are (item, seed) tuples it resamples items (`cluster_on_item`).
    """
    keys, xa, xb, n_dropped = _align(a, b, pairs)
    result = {"n_pairs": len(keys), "n_dropped": n_dropped}
    if not keys:
        return {
            **result,
            "test": None,
            "statistic": None,
            "p_value": None,
            "mean_diff": None,
            "ci": None,
            "reason": "no pair has an outcome in both arms",
        }
    is_binary = binary if binary is not None else bool(np.isin(np.concatenate([xa, xb]), (0.0, 1.0)).all())
    result.update(_mcnemar(xa, xb) if is_binary else _wilcoxon(xa, xb))
    diff = xa - xb
    clusters = [k[0] for k in keys] if cluster_on_item and all(isinstance(k, tuple) and k for k in keys) else None
    _, low, high = bootstrap_ci(diff, n_boot=n_boot, alpha=alpha, seed=seed, clusters=clusters)
    result.update({"mean_diff": float(diff.mean()), "ci": (low, high)})
    return result


def _align(a, b, pairs) -> tuple[list, np.ndarray, np.ndarray, int]:
    if isinstance(a, (Mapping, pd.Series)) and isinstance(b, (Mapping, pd.Series)):
        keys = list(pairs) if pairs is not None else [k for k in a.keys() if k in b]
        va = [a[k] if k in a else None for k in keys]
        vb = [b[k] if k in b else None for k in keys]
    else:
        if pairs is None:
            raise ValueError("sequences a and b need `pairs`: one (item, seed) key per position")
        keys, va, vb = list(pairs), list(a), list(b)
        if not len(keys) == len(va) == len(vb):
            raise ValueError(f"a, b and pairs must have the same length ({len(va)}, {len(vb)}, {len(keys)})")
    complete = [i for i in range(len(keys)) if not (_missing(va[i]) or _missing(vb[i]))]
    xa = np.array([float(va[i]) for i in complete])
    xb = np.array([float(vb[i]) for i in complete])
    return [keys[i] for i in complete], xa, xb, len(keys) - len(complete)


def _mcnemar(xa: np.ndarray, xb: np.ndarray) -> dict:
    a_only = int(((xa == 1) & (xb == 0)).sum())
    b_only = int(((xa == 0) & (xb == 1)).sum())
    discordant = a_only + b_only
    p = _scipy_stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "test": "mcnemar_exact",
        "statistic": float(a_only),
        "p_value": float(p),
        "a_only": a_only,
        "b_only": b_only,
    }


def _wilcoxon(xa: np.ndarray, xb: np.ndarray) -> dict:
    if np.all(xa == xb):
        return {"test": "wilcoxon", "statistic": 0.0, "p_value": 1.0}
    res = _scipy_stats.wilcoxon(xa, xb)
    return {"test": "wilcoxon", "statistic": float(res.statistic), "p_value": float(res.pvalue)}


# ======================================================================= per-arm summaries


def summarise_arm(df: pd.DataFrame, metric: str, cluster_col: Optional[str] = "item", **bootstrap) -> dict:
    """Estimate, bootstrap CI (clustered on `cluster_col` when present) and n of one metric."""
    values = [np.nan if _missing(v) else float(v) for v in df[metric]]
    clusters = list(df[cluster_col]) if cluster_col is not None and cluster_col in df.columns else None
    n = int(np.sum(~np.isnan(values))) if values else 0
    summary = {
        "metric": metric,
        "n": n,
        "n_clusters": None if clusters is None else len({c for c, v in zip(clusters, values) if not np.isnan(v)}),
    }
    if n == 0:
        return {**summary, "estimate": None, "low": None, "high": None}
    estimate, low, high = bootstrap_ci(values, clusters=clusters, **bootstrap)
    return {**summary, "estimate": estimate, "low": low, "high": high}


def summarise_arms(
    df: pd.DataFrame, metric: str, arm_col: str = "arm", cluster_col: Optional[str] = "item", **bootstrap
) -> pd.DataFrame:
    """`summarise_arm` for each arm: one row per arm, sorted by arm."""
    rows = [
        {arm_col: arm, **summarise_arm(group, metric, cluster_col, **bootstrap)}
        for arm, group in df.groupby(arm_col, sort=True)
    ]
    return pd.DataFrame(rows)


# ======================================================================= agreement


def krippendorff_alpha(
    labels_by_unit_and_coder,
    level: str = "nominal",
    *,
    unit_col: str = "unit",
    coder_col: str = "coder",
    label_col: str = "label",
) -> dict:
    """Krippendorff's alpha from a long table of (unit, coder, label) rows.

    Accepts a DataFrame with those columns, or an iterable of 3-tuples / dicts. Rows without a
    label are dropped; a repeated (unit, coder) keeps its last label. Units labelled by a
    single coder carry no agreement information and are left out (`n_single_coder_units`).
    Returns alpha (None with a `reason` when it is undefined), `n_units` (units with >= 2
    coders), `mean_coders_per_unit` over those, `n_coders`.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    table = _long_table(labels_by_unit_and_coder, unit_col, coder_col, label_col)
    n_rows = len(table)
    table = table.drop_duplicates(["unit", "coder"], keep="last")
    coders_per_unit = table.groupby("unit", sort=False)["coder"].nunique()
    pairable = coders_per_unit[coders_per_unit >= 2]
    result = {
        "alpha": None,
        "level": level,
        "n_units": int(len(pairable)),
        "mean_coders_per_unit": float(pairable.mean()) if len(pairable) else None,
        "n_coders": int(table["coder"].nunique()),
        "n_single_coder_units": int((coders_per_unit == 1).sum()),
        "n_duplicates_replaced": n_rows - len(table),
        "reason": None,
    }
    table = table[table["unit"].isin(pairable.index)]
    if table.empty:
        return {**result, "reason": "no unit has labels from two or more coders"}
    if table["label"].nunique() < 2:
        return {
            **result,
            "reason": "all paired labels are the same value, so expected disagreement is zero and alpha is undefined",
        }
    table = table.assign(value=_label_values(table["label"], level))
    matrix = table.pivot(index="coder", columns="unit", values="value").to_numpy(dtype=float)
    import krippendorff  # light, but only needed here

    alpha = krippendorff.alpha(reliability_data=matrix, level_of_measurement=level)
    return {**result, "alpha": float(alpha)}


def _long_table(data, unit_col: str, coder_col: str, label_col: str) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        missing = [c for c in (unit_col, coder_col, label_col) if c not in data.columns]
        if missing:
            raise ValueError(f"labels table lacks column(s) {', '.join(missing)}")
        frame = data[[unit_col, coder_col, label_col]].copy()
    else:
        rows = [(r[unit_col], r[coder_col], r[label_col]) if isinstance(r, Mapping) else tuple(r) for r in data]
        if any(len(r) != 3 for r in rows):
            raise ValueError("each label row must be (unit, coder, label)")
        frame = pd.DataFrame(rows, columns=[unit_col, coder_col, label_col], dtype=object)
    frame.columns = ["unit", "coder", "label"]
    return frame[[not _missing(v) for v in frame["label"]]].reset_index(drop=True)


def _label_values(labels: pd.Series, level: str) -> np.ndarray:
    """Nominal labels of any type become category codes; other levels must be numbers."""
    if level == "nominal":
        return pd.factorize(labels.astype(object))[0].astype(float)
    try:
        return pd.to_numeric(labels).to_numpy(dtype=float)
    except (ValueError, TypeError):
        raise ValueError(f"{level} alpha needs numeric labels; use level='nominal' for categories") from None
