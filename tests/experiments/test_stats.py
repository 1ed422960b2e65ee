"""Statistics: bootstrap intervals with known answers, paired tests, Krippendorff's alpha."""

from math import comb

import numpy as np
import pandas as pd
import pytest

from experiments.stats import bootstrap_ci, krippendorff_alpha, paired_test, summarise_arm, summarise_arms

# ----------------------------------------------------------------- bootstrap


def test_bootstrap_bernoulli_matches_normal_theory():
    n, p = 2000, 0.3
    values = np.random.default_rng(1).random(n) < p
    estimate, low, high = bootstrap_ci(values)
    assert abs(estimate - p) < 0.02
    assert low < p < high
    expected_width = 2 * 1.96 * np.sqrt(p * (1 - p) / n)
    assert (high - low) == pytest.approx(expected_width, rel=0.1)


def test_bootstrap_is_deterministic_for_a_seed():
    values = np.random.default_rng(2).normal(size=300)
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)


def _correlated_items(n_items=40, n_seeds=10):
    """Strong item effect, tiny seed noise: seeds of one item are nearly copies."""
    rng = np.random.default_rng(3)
    item_means = rng.normal(0, 1, n_items)
    values = np.repeat(item_means, n_seeds) + rng.normal(0, 0.05, n_items * n_seeds)
    items = np.repeat([f"item{i}" for i in range(n_items)], n_seeds)
    return values, items


def test_cluster_bootstrap_is_wider_when_seeds_are_correlated():
    values, items = _correlated_items()
    _, iid_low, iid_high = bootstrap_ci(values)
    _, cl_low, cl_high = bootstrap_ci(values, clusters=items)
    assert (cl_high - cl_low) > 2.5 * (iid_high - iid_low)  # design effect ~ sqrt(10)


def test_cluster_mean_shortcut_equals_generic_statistic():
    values, items = _correlated_items(12, 3)
    fast = bootstrap_ci(values, clusters=items, n_boot=300)
    slow = bootstrap_ci(values, stat=lambda x: float(np.mean(x)), clusters=items, n_boot=300)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_generic_stat_without_axis_and_missing_values():
    estimate, low, high = bootstrap_ci([1.0, None, 2.0, np.nan, 3.0, 4.0], stat=lambda x: float(np.median(x)))
    assert estimate == 2.5 and 1.0 <= low <= estimate <= high <= 4.0
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([None, np.nan])
    with pytest.raises(ValueError, match="clusters"):
        bootstrap_ci([1.0, 2.0], clusters=["a"])


# ----------------------------------------------------------------- paired tests


def test_mcnemar_exact_on_constructed_table():
    # 10 pairs where only arm a succeeds, 2 where only b does, 20 concordant.
    a = [1] * 10 + [0] * 2 + [1] * 12 + [0] * 8
    b = [0] * 10 + [1] * 2 + [1] * 12 + [0] * 8
    pairs = [(f"item{i}", 0) for i in range(len(a))]
    result = paired_test(a, b, pairs)
    exact = 2 * sum(comb(12, k) for k in range(3)) / 2**12  # two-sided binomial, 12 discordant
    assert result["test"] == "mcnemar_exact"
    assert result["p_value"] == pytest.approx(exact) == pytest.approx(0.0385742, abs=1e-6)
    assert (result["a_only"], result["b_only"], result["n_pairs"]) == (10, 2, 32)
    assert result["mean_diff"] == pytest.approx(8 / 32)
    low, high = result["ci"]
    assert low < 8 / 32 < high


def test_mcnemar_without_discordant_pairs_is_not_significant():
    result = paired_test({("i", 0): 1, ("j", 0): 0}, {("i", 0): 1, ("j", 0): 0})
    assert result["p_value"] == 1.0 and result["mean_diff"] == 0.0


def test_wilcoxon_on_continuous_outcomes():
    a = {(f"item{i}", s): 0.1 * i + 0.01 * s for i in range(5) for s in range(2)}
    b = {key: value + 0.5 for key, value in a.items()}
    result = paired_test(a, b)
    assert result["test"] == "wilcoxon" and result["n_pairs"] == 10
    assert result["p_value"] == pytest.approx(2 / 2**10)  # exact: all 10 differences negative
    assert result["mean_diff"] == pytest.approx(-0.5)
    assert result["ci"] == pytest.approx((-0.5, -0.5))


def test_paired_test_drops_incomplete_pairs_and_handles_none_left():
    a = {("x", 0): 1.0, ("x", 1): None, ("y", 0): 0.25, ("z", 0): 0.5}
    b = {("x", 0): 0.5, ("x", 1): 0.5, ("y", 0): 0.75}
    result = paired_test(a, b, pairs=[("x", 0), ("x", 1), ("y", 0), ("z", 0)])
    assert result["n_pairs"] == 2 and result["n_dropped"] == 2
    assert result["mean_diff"] == pytest.approx(0.0)
    empty = paired_test({("x", 0): None}, {("x", 0): 1.0})
    assert empty["n_pairs"] == 0 and empty["p_value"] is None and empty["reason"]


def test_paired_test_sequences_need_pairs():
    with pytest.raises(ValueError, match="pairs"):
        paired_test([1, 0], [0, 1])


# ----------------------------------------------------------------- summaries


def test_summarise_arm_counts_non_missing_and_clusters():
    df = pd.DataFrame(
        {
            "arm": ["a"] * 6 + ["b"] * 3,
            "item": ["i1", "i1", "i2", "i2", "i3", "i3", "i1", "i2", "i3"],
            "flipped": [True, False, True, None, False, False, True, True, True],
        }
    )
    summary = summarise_arm(df[df.arm == "a"], "flipped")
    assert summary["n"] == 5 and summary["n_clusters"] == 3
    assert summary["estimate"] == pytest.approx(2 / 5)
    assert summary["low"] <= summary["estimate"] <= summary["high"]
    table = summarise_arms(df, "flipped")
    assert list(table["arm"]) == ["a", "b"] and list(table["n"]) == [5, 3]
    assert table.loc[1, "estimate"] == 1.0
    nothing = summarise_arm(pd.DataFrame({"item": ["i"], "m": [None]}), "m")
    assert nothing["n"] == 0 and nothing["estimate"] is None


# ----------------------------------------------------------------- Krippendorff's alpha


def _long(matrix, coders="ABCD"):
    """Coder-by-unit matrix (None = not coded) -> long (unit, coder, label) rows."""
    return [(f"u{u + 1}", coders[c], v) for c, row in enumerate(matrix) for u, v in enumerate(row) if v is not None]


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 coders x 12 units with
# missing values: alpha nominal 0.743, interval 0.849. Unit 12 has a single coder.
TEXTBOOK = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_krippendorff_textbook_example():
    rows = _long(TEXTBOOK)
    nominal = krippendorff_alpha(rows)
    assert nominal["alpha"] == pytest.approx(0.743, abs=5e-4)
    assert nominal["n_units"] == 11 and nominal["n_single_coder_units"] == 1 and nominal["n_coders"] == 4
    assert nominal["mean_coders_per_unit"] == pytest.approx(40 / 11)
    assert krippendorff_alpha(rows, level="interval")["alpha"] == pytest.approx(0.849, abs=5e-4)


def test_krippendorff_binary_textbook_example_from_dataframe():
    a = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    b = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    df = pd.DataFrame(_long([a, b], coders="AB"), columns=["item", "annotator", "stance"])
    result = krippendorff_alpha(df, unit_col="item", coder_col="annotator", label_col="stance")
    assert result["alpha"] == pytest.approx(0.095, abs=5e-4)


def test_krippendorff_perfect_agreement_with_string_labels():
    labels = ["maintained", "revised", "maintained", "unclear", "revised"]
    rows = [(f"t{u}", coder, label) for u, label in enumerate(labels) for coder in ("ann1", "ann2", "ann3")]
    result = krippendorff_alpha(rows)
    assert result["alpha"] == pytest.approx(1.0)
    assert result["n_units"] == 5 and result["mean_coders_per_unit"] == 3.0


def test_krippendorff_not_enough_data_returns_none_with_reason():
    single = krippendorff_alpha([("u1", "a", "x"), ("u2", "b", "y"), ("u3", "a", None)])
    assert single["alpha"] is None and "two or more coders" in single["reason"]
    assert single["n_units"] == 0 and single["n_single_coder_units"] == 2
    same = krippendorff_alpha([("u1", "a", "x"), ("u1", "b", "x"), ("u2", "a", "x"), ("u2", "b", "x")])
    assert same["alpha"] is None and "undefined" in same["reason"]


def test_krippendorff_duplicates_keep_last_and_levels_are_checked():
    rows = [("u1", "a", "x"), ("u1", "b", "y"), ("u1", "b", "x"), ("u2", "a", "y"), ("u2", "b", "y")]
    result = krippendorff_alpha(rows)
    assert result["n_duplicates_replaced"] == 1 and result["alpha"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="numeric labels"):
        krippendorff_alpha(rows, level="ordinal")
    with pytest.raises(ValueError, match="level must be"):
        krippendorff_alpha(rows, level="fuzzy")
