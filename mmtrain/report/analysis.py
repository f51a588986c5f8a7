"""The numbers of ``mmtrain report``, as pure functions (no files, no plotting), each tested against a
naive reference in tests/test_report.py: seed groups and their spread, mean ± spread curves,
correlations, random-forest parameter importance, and the min/max-preserving downsampling used to
draw long histories.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmtrain.report.runs import SEED_KEY, is_bookkeeping

# Fewer runs with a final validation loss than this, and a random forest has nothing to learn from.
MIN_RUNS_FOR_FOREST = 4


# ----------------------------------------------------------------------------------------------- drawing

def downsample_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` points of ``values`` that draw like all of them: the series is
    cut into ``max_points // 4`` equal buckets and each keeps its first, last, smallest and largest
    value (the M4 rule), so a one-step spike or dip is never averaged away. NaNs are never picked as
    extremes. A series already short enough is returned whole (``arange(len(values))``)."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = max(1, max_points // 4)
    size = math.ceil(n / buckets)
    padded = np.full(buckets * size, np.nan)
    padded[:n] = values
    grid = padded.reshape(buckets, size)
    nan = np.isnan(grid)
    base = np.arange(buckets) * size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        lowest = base + np.argmin(np.where(nan, np.inf, grid), axis=1)
        highest = base + np.argmax(np.where(nan, -np.inf, grid), axis=1)
    last = np.minimum(base + size - 1, n - 1)
    idx = np.unique(np.concatenate([base, last, lowest, highest]))
    return idx[idx < n]


def points_per_line(lines: int, budget: int = 40_000, most: int = 2000, least: int = 200) -> int:
    """How many points each of ``lines`` lines of one chart may draw: the lines of a chart share
    ``budget`` points (so the ~25 charts of a 100-run sweep make a page of ~15 MB that draws in seconds;
    100 overlaid lines of 400 points each look as 100 lines of 10,000 at a chart's ~600 pixels' width),
    and a line gets at most ``most``, at least ``least``."""
    return int(min(most, max(least, budget // max(1, lines))))


# ----------------------------------------------------------------------------------------------- seeds

def config_key(flat: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """What makes two runs the same config: every field but the seed and the bookkeeping ones."""
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if k != SEED_KEY and not is_bookkeeping(k)))


def seed_groups(flats: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of the runs grouped by config (see config_key), groups in order of their first run,
    members in the order given. A group of one is a config run with a single seed."""
    groups: dict[tuple, list[int]] = {}
    for i, flat in enumerate(flats):
        groups.setdefault(config_key(flat), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class Spread:
    """Summary of one config's values over its seeds. ``std``/``var`` are the sample statistics (n − 1
    in the denominator, as statistics.stdev), NaN below two values."""

    n: int
    mean: float
    std: float
    var: float
    min: float
    max: float

    @property
    def cv(self) -> float:
        """Coefficient of variation, std / |mean| (NaN where the mean is 0)."""
        return self.std / abs(self.mean) if self.mean else math.nan


def spread(values: Sequence[float | None]) -> Spread:
    """Spread of the finite ``values`` (None and NaN left out)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if not len(x):
        return Spread(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    var = float(np.var(x, ddof=1)) if len(x) > 1 else math.nan
    return Spread(len(x), float(np.mean(x)), math.sqrt(var) if len(x) > 1 else math.nan, var,
                  float(np.min(x)), float(np.max(x)))


def pooled_std(groups: Sequence[Sequence[float | None]]) -> float:
    """The seed-to-seed standard deviation pooled over configs: sqrt(Σ (nᵢ−1)·varᵢ / Σ (nᵢ−1)) over
    the groups with at least two finite values; NaN if there is none. It is the noise floor a
    parameter's effect must clear."""
    num = den = 0.0
    for values in groups:
        s = spread(values)
        if s.n > 1:
            num += (s.n - 1) * s.var
            den += s.n - 1
    return math.sqrt(num / den) if den else math.nan


def mean_band(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std, count) of several runs' curves on the union of their steps: at each step the
    mean and sample std (n − 1) over the runs that logged it (NaN values left out; std NaN where fewer
    than two), so a run still in progress only counts where it has got to."""
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.zeros(0, dtype=np.int64)
    grid = np.full((len(series), len(steps)), np.nan)
    for row, (s, v) in enumerate(series):
        grid[row, np.searchsorted(steps, s)] = v
    count = np.sum(~np.isnan(grid), axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the right answer
        mean = np.nanmean(grid, axis=0)
        std = np.where(count > 1, np.nanstd(grid, axis=0, ddof=1), np.nan)
    return steps, mean, std, count


# ----------------------------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class Encoded:
    """A parameter's values as numbers: ``kind`` "numeric" (as they are), "log" (positive numbers
    spanning more than a factor of 10: drawn and correlated as log10), or "categorical" (codes
    0..k−1 for ``labels``, sorted)."""

    values: np.ndarray
    kind: str
    labels: tuple[str, ...] = ()

    @property
    def drawn(self) -> np.ndarray:
        """The values on the axis they are drawn on (log10 for a log parameter)."""
        return np.log10(self.values) if self.kind == "log" else self.values


def encode(values: Sequence[Any]) -> Encoded:
    """Encode one parameter's values over the runs (see Encoded). Booleans, text, and a mix of types
    (a field missing from an older config) are categorical."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        x = np.asarray(values, dtype=np.float64)
        if np.all(np.isfinite(x)):
            positive = x[x > 0]
            if len(positive) == len(x) and positive.max() / positive.min() > 10:
                return Encoded(x, "log")
            return Encoded(x, "numeric")
    labels = tuple(sorted({str(v) for v in values}))
    codes = {label: i for i, label in enumerate(labels)}
    return Encoded(np.asarray([codes[str(v)] for v in values], dtype=np.float64), "categorical", labels)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of two equal-length sequences; NaN when either is constant or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy)) / den if den > 0 else math.nan


def correlation_ratio(codes: Sequence[float], y: Sequence[float]) -> float:
    """η, the correlation ratio of a categorical variable and y: sqrt(between-category sum of squares /
    total sum of squares), in [0, 1]; NaN when y is constant. For two categories it is |Pearson's r|."""
    codes, y = np.asarray(codes), np.asarray(y, dtype=np.float64)
    total = float(np.sum((y - y.mean()) ** 2))
    if total <= 0:
        return math.nan
    between = sum(float(np.sum(codes == c)) * (float(y[codes == c].mean()) - float(y.mean())) ** 2
                  for c in np.unique(codes))
    return math.sqrt(between / total)


@dataclass(frozen=True)
class Importance:
    """One parameter's row of the importance table. ``correlation`` is Pearson's r with the target
    (of log10 of the value for a log parameter; of the 0/1 code for a two-value category), or η
    (``correlation_kind`` "eta", unsigned) for a category of more than two values. ``importance`` is
    the random forest's impurity importance (the features' importances sum to 1), NaN when there are
    too few runs."""

    param: str
    kind: str
    correlation: float
    correlation_kind: str
    importance: float
    n: int
    distinct: int


def parameter_importance(params: dict[str, Sequence[Any]], target: Sequence[float],
                         seed: int = 0) -> tuple[list[Importance], str | None]:
    """The importance table, as W&B's parameter-importance panel computes it: for each parameter its
    correlation with ``target`` (the final validation loss) and its importance in a random forest
    (scikit-learn's RandomForestRegressor, 200 trees, ``random_state=seed``) that predicts the target
    from all the parameters together (categories as codes; trees do not care about scale).

    ``params`` maps each parameter to its value in every run, aligned with ``target`` (runs without a
    final validation loss must be left out by the caller). Returns (rows sorted by importance, then
    |correlation|; why the forest was not fitted, or None)."""
    names = list(params)
    y = np.asarray(target, dtype=np.float64)
    encoded = {name: encode(list(params[name])) for name in names}
    rows_corr: dict[str, tuple[float, str]] = {}
    for name, enc in encoded.items():
        if enc.kind == "categorical" and len(enc.labels) > 2:
            rows_corr[name] = (correlation_ratio(enc.values, y), "eta")
        else:
            rows_corr[name] = (pearson(enc.drawn, y), "pearson")
    importances = dict.fromkeys(names, math.nan)
    why = None
    if not names:
        why = "no parameter varies"
    elif len(y) < MIN_RUNS_FOR_FOREST:
        why = f"{len(y)} run(s) with a final validation loss; the random forest needs at least {MIN_RUNS_FOR_FOREST}"
    elif float(np.ptp(y)) == 0.0:
        why = "every run has the same final validation loss"
    else:
        from sklearn.ensemble import RandomForestRegressor

        features = np.column_stack([encoded[n].values for n in names])
        forest = RandomForestRegressor(n_estimators=200, random_state=seed, n_jobs=1).fit(features, y)
        importances = dict(zip(names, (float(v) for v in forest.feature_importances_), strict=True))
    rows = [Importance(name, encoded[name].kind, rows_corr[name][0], rows_corr[name][1], importances[name], len(y),
                       len(set(map(str, params[name])))) for name in names]

    def order(row: Importance) -> tuple[float, float]:
        imp = row.importance if math.isfinite(row.importance) else -1.0
        corr = abs(row.correlation) if math.isfinite(row.correlation) else -1.0
        return (-imp, -corr)

    return sorted(rows, key=order), why


def verdict(rows: Sequence[Importance], why_no_forest: str | None, seed_noise: float = math.nan) -> str:
    """One sentence saying which parameter matters (the first row of ``rows``), and how sure that is."""
    if not rows:
        return "No parameter varies across these runs."
    top = rows[0]
    corr = (f"correlation {top.correlation:+.2f}" if top.correlation_kind == "pearson"
            else f"correlation ratio η {top.correlation:.2f}") if math.isfinite(top.correlation) else "no correlation"
    if len(rows) == 1:
        text = (f"{top.param} is the only parameter that varies: {corr} with the final validation loss"
                f" (over {top.n} runs)")
    elif math.isfinite(top.importance):
        text = (f"{top.param} matters most: random-forest importance {top.importance:.2f} of 1, {corr}"
                f" (over {top.n} runs)")
    else:
        text = f"{top.param} has the strongest correlation with the final validation loss: {corr} ({why_no_forest})"
    if top.correlation_kind == "pearson" and math.isfinite(top.correlation) and abs(top.correlation) >= 0.3:
        text += f"; a higher {top.param} gives a {'higher' if top.correlation > 0 else 'lower'} final validation loss"
    if math.isfinite(seed_noise):
        text += f". Seed-to-seed spread (pooled std) of the final validation loss: {seed_noise:.4g}"
    return text + "."


def describe_values(values: Sequence[Any]) -> str:
    """A short text of a parameter's values for the table: the distinct values, or the range."""
    distinct = sorted({str(v) for v in values}, key=_natural)
    if len(distinct) <= 6:
        return ", ".join(distinct)
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) == len(values):
        return f"{len(distinct)} values in [{min(numbers):.4g}, {max(numbers):.4g}]"
    return f"{len(distinct)} values"


def _natural(text: str) -> tuple[int, float | str]:
    try:
        return (0, float(text))
    except ValueError:
        return (1, text)

