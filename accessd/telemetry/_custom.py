"""Custom metrics (``POST /metrics/track``, CONTRACT §11): validation, the catalogue of names and series, and
their exposition.

A body is checked whole before anything is kept (all or nothing): :meth:`CustomMetrics.check` raises
:class:`Rejected` naming the field and its index in the batch, 400 for a bad sample and 409 when a sample's
type or label names differ from what its name already has. :meth:`CustomMetrics.commit` then reserves the
series and returns :class:`Sample` objects that point at them; whoever takes the samples (the local flusher,
or the forwarder on an edge) decides when their values land.

Memory is bounded: at most ``max_series`` series per name, and a series not updated for ``series_ttl_s``
expires (:meth:`CustomMetrics.sweep`), so a client cycling label values cannot grow the process for ever. A
name whose series have all expired is forgotten and may come back with another type.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
TYPES = ("counter", "gauge", "histogram")
MAX_BATCH = 1000
MAX_LABELS = 16
MAX_LABEL_VALUE = 256
FIELDS = frozenset({"name", "type", "value", "labels"})
MAX_KNOWN = 100_000
_NO_LABELS: dict[str, str] = {}
# Prometheus's default buckets: custom histograms are general purpose, not latency-of-accessd.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_BUCKET_LABELS = (*(repr(b) for b in BUCKETS), "+Inf")
HELP = "custom metric, via POST /metrics/track"


class Rejected(Exception):
    """A body refused: ``status`` 400 (bad input, or over the series cap) or 409 (type or label clash)."""

    def __init__(self, status: int, field: str, problem: str, index: int | None = None) -> None:
        super().__init__(f"{field}: {problem}")
        self.status = status
        self.field = field
        self.problem = problem
        self.index = index

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"field": self.field, "problem": self.problem}
        if self.index is not None:
            details["index"] = self.index
        return details


class Family:
    __slots__ = ("name", "kind", "label_names", "series")

    def __init__(self, name: str, kind: str, label_names: tuple[str, ...]) -> None:
        self.name = name
        self.kind = kind
        self.label_names = label_names
        self.series: dict[tuple[str, ...], Series] = {}

    def exposed(self) -> set[str]:
        """Every name this family takes in the exposition (a family clashing with one of them is refused)."""
        return _exposed(self.name, self.kind)


class Series:
    __slots__ = ("family", "labels", "updated", "value", "buckets", "sum", "expired")

    def __init__(self, family: Family, labels: tuple[str, ...]) -> None:
        self.family = family
        self.labels = labels
        self.updated = 0.0
        self.value = 0.0  # counter total, gauge value, histogram count
        histogram = family.kind == "histogram"
        self.buckets = [0] * (len(BUCKETS) + 1) if histogram else None  # per bucket, not cumulative
        self.sum = 0.0
        self.expired = False

    def apply(self, value: float) -> None:
        if self.buckets is not None:
            self.value += 1.0
            self.buckets[bisect_left(BUCKETS, value)] += 1
            self.sum += value
        elif self.family.kind == "gauge":
            self.value = value
        else:
            self.value += value

    def to_json(self, value: float) -> dict[str, Any]:
        """A sample of this series as a client sends it (to forward it)."""
        family = self.family
        labels = dict(zip(family.label_names, self.labels, strict=True))
        return {"name": family.name, "type": family.kind, "value": value, "labels": labels}


# A committed sample: the series it updates and the value; it lands when applied (``series.apply(value)``).
Sample = tuple[Series, float]


@dataclass(slots=True)
class Checked:
    """One sample that passed the checks; ``labels`` in ``Family.label_names`` order; ``key`` as sent."""

    name: str
    kind: str
    label_names: tuple[str, ...]
    labels: tuple[str, ...]
    value: float
    key: tuple[Any, ...]


class CustomMetrics:
    """The catalogue of custom metric names and their series; a prometheus-client collector of them."""

    def __init__(self, *, max_series: int = 1000, series_ttl_s: float = 900.0) -> None:
        self.max_series = max_series
        self.series_ttl_s = series_ttl_s
        self._families: dict[str, Family] = {}  # by base name (a counter's without ``_total``)
        self._exposed: dict[str, str] = {}  # exposition name -> base name of the family taking it
        # A series already checked, by the sample's name, type and labels as clients send them: a repeat
        # sample skips every check but its value's (most traffic updates series that exist).
        self._known: dict[tuple[Any, ...], Series] = {}

    def check(self, body: object) -> list[Checked | Sample]:
        """Every sample of a single or ``{"metrics": [...]}`` body, checked against each other and the
        catalogue; raises :class:`Rejected` for the first problem. Changes nothing."""
        if type(body) is dict and "metrics" in body:
            items = body["metrics"]
            if len(body) != 1:
                raise Rejected(400, "body", "a batch holds only 'metrics'")
            if not isinstance(items, list) or not items:
                raise Rejected(400, "metrics", "expected a non-empty list")
            if len(items) > MAX_BATCH:
                raise Rejected(400, "metrics", f"at most {MAX_BATCH} samples per body, got {len(items)}")
            batch = True
        else:
            items, batch = [body], False
        checked: list[Checked | Sample] = []
        known = self._known
        new: dict[str, tuple[Family, set[tuple[str, ...]]]] = {}  # names and series this body adds
        for index, item in enumerate(items):
            if type(item) is dict and item.keys() <= FIELDS:  # the fast path: a known series
                labels = item.get("labels", _NO_LABELS)
                try:
                    series = known.get((item.get("name"), item.get("type"), *labels.items()))
                except (TypeError, AttributeError):  # labels not an object, or a value not hashable
                    series = None
                value = item.get("value")
                if series is not None and (type(value) is float or type(value) is int):
                    if math.isfinite(value) and (value >= 0 or series.family.kind != "counter"):
                        checked.append((series, float(value)))
                        continue
            at = f"metrics[{index}]." if batch else ""
            sample = _parse(item, at, index if batch else None)
            self._fits(sample, at, index if batch else None, new)
            checked.append(sample)
        return checked

    def commit(self, checked: list[Checked | Sample], now: float) -> list[Sample]:
        """Reserve the series of checked samples (marking them updated at ``now``); their values land when
        the caller applies the returned samples."""
        samples = []
        for c in checked:
            if type(c) is tuple:
                c[0].updated = now
                samples.append(c)
                continue
            assert isinstance(c, Checked)
            base = _base(c.name, c.kind)
            family = self._families.get(base)
            if family is None:
                family = self._families[base] = Family(base, c.kind, c.label_names)
                for exposed in family.exposed():
                    self._exposed[exposed] = base
            series = family.series.get(c.labels)
            if series is None:
                series = family.series[c.labels] = Series(family, c.labels)
            if len(self._known) >= MAX_KNOWN:  # label orders and name spellings could grow it: start again
                self._known.clear()
            self._known[c.key] = series
            series.updated = now
            samples.append((series, c.value))
        return samples

    def sweep(self, now: float) -> int:
        """Forget series not updated for ``series_ttl_s`` (and names left with none); returns how many."""
        cutoff = now - self.series_ttl_s
        expired = 0
        for base, family in list(self._families.items()):
            stale = [key for key, series in family.series.items() if series.updated <= cutoff]
            for key in stale:
                family.series.pop(key).expired = True
            expired += len(stale)
            if not family.series:
                del self._families[base]
                for exposed in family.exposed():
                    self._exposed.pop(exposed, None)
        if expired:
            self._known = {key: series for key, series in self._known.items() if not series.expired}
        return expired

    def series_count(self, name: str) -> int:
        family = self._families.get(name) or self._families.get(_base(name, "counter"))
        return len(family.series) if family is not None else 0

    def collect(self) -> Iterator[Metric]:
        for family in self._families.values():
            names = family.label_names
            if family.kind == "counter":
                counter = CounterMetricFamily(family.name, HELP, labels=names)
                for series in family.series.values():
                    counter.add_metric(series.labels, series.value)
                yield counter
            elif family.kind == "gauge":
                gauge = GaugeMetricFamily(family.name, HELP, labels=names)
                for series in family.series.values():
                    gauge.add_metric(series.labels, series.value)
                yield gauge
            else:
                histogram = HistogramMetricFamily(family.name, HELP, labels=names)
                for series in family.series.values():
                    assert series.buckets is not None
                    cumulative, total = [], 0
                    for le, count in zip(_BUCKET_LABELS, series.buckets, strict=True):
                        total += count
                        cumulative.append((le, float(total)))
                    histogram.add_metric(series.labels, cumulative, series.sum)
                yield histogram

    def describe(self) -> list[Metric]:
        return []  # names come and go; the registry must not reserve them

    def _fits(
        self,
        sample: Checked,
        at: str,
        index: int | None,
        new: dict[str, tuple[Family, set[tuple[str, ...]]]],
    ) -> None:
        """Raise unless ``sample`` agrees with its name's type and label names and fits under the cap."""
        base = _base(sample.name, sample.kind)
        family = self._families.get(base)
        adding: set[tuple[str, ...]]
        if family is None and base in new:
            family, adding = new[base]
        elif family is None:
            taken = {self._exposed[n] for n in _exposed(base, sample.kind) if n in self._exposed}
            taken |= {b for b, (f, _) in new.items() if f.exposed() & _exposed(base, sample.kind)}
            if taken:
                problem = f"{sample.name!r} clashes with the existing metric {min(taken)!r}"
                raise Rejected(409, f"{at}name", problem, index)
            family = Family(base, sample.kind, sample.label_names)
            adding = set()
            new[base] = (family, adding)
        else:
            adding = new.setdefault(base, (family, set()))[1]
        if family.kind != sample.kind:
            problem = f"{sample.name!r} is a {family.kind}, not a {sample.kind}"
            raise Rejected(409, f"{at}type", problem, index)
        if family.label_names != sample.label_names:
            raise Rejected(
                409,
                f"{at}labels",
                f"{sample.name!r} has the label names {list(family.label_names)}, "
                f"not {list(sample.label_names)}",
                index,
            )
        if sample.labels not in family.series and sample.labels not in adding:
            if len(family.series) + len(adding) >= self.max_series:
                raise Rejected(
                    400,
                    f"{at}labels",
                    f"{sample.name!r} already has {self.max_series} series, the most one name may have "
                    f"(a series not updated for {self.series_ttl_s:g} s expires)",
                    index,
                )
            adding.add(sample.labels)


def _parse(item: object, at: str, index: int | None) -> Checked:
    if not isinstance(item, dict):
        raise Rejected(400, at.rstrip(".") or "body", "expected a JSON object", index)
    unknown = item.keys() - FIELDS
    if unknown:
        raise Rejected(400, f"{at}{min(unknown)}", "unknown field", index)
    name, kind, value, labels = item.get("name"), item.get("type"), item.get("value"), item.get("labels", {})
    if not isinstance(name, str) or not NAME.match(name):
        raise Rejected(400, f"{at}name", "expected a name matching [a-zA-Z_:][a-zA-Z0-9_:]*", index)
    if name.startswith("accessd_"):
        raise Rejected(400, f"{at}name", "the accessd_ prefix is reserved for built-in metrics", index)
    if kind not in TYPES:
        raise Rejected(400, f"{at}type", "expected counter, gauge or histogram", index)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Rejected(400, f"{at}value", "expected a finite number", index)
    if kind == "counter" and value < 0:
        raise Rejected(400, f"{at}value", "a counter only goes up: expected a number >= 0", index)
    if not isinstance(labels, dict):
        raise Rejected(400, f"{at}labels", "expected an object of label names to string values", index)
    if len(labels) > MAX_LABELS:
        raise Rejected(400, f"{at}labels", f"at most {MAX_LABELS} labels", index)
    for label, text in labels.items():
        if not LABEL_NAME.match(label) or label.startswith("__"):
            raise Rejected(400, f"{at}labels.{label}", "not a label name ([a-zA-Z_][a-zA-Z0-9_]*)", index)
        if kind == "histogram" and label == "le":
            raise Rejected(400, f"{at}labels.le", "le is the histogram's own bucket label", index)
        if not isinstance(text, str) or len(text) > MAX_LABEL_VALUE:
            problem = f"expected a string of <= {MAX_LABEL_VALUE} chars"
            raise Rejected(400, f"{at}labels.{label}", problem, index)
    names = tuple(sorted(labels))
    key = (name, kind, *labels.items())
    return Checked(name, kind, names, tuple(labels[n] for n in names), float(value), key)


def _base(name: str, kind: str) -> str:
    """A counter is one family with or without its ``_total`` suffix, as prometheus-client has it."""
    return name[:-6] if kind == "counter" and name.endswith("_total") and len(name) > 6 else name


def _exposed(base: str, kind: str) -> set[str]:
    if kind == "counter":
        return {base, base + "_total"}
    if kind == "histogram":
        return {base, base + "_bucket", base + "_sum", base + "_count"}
    return {base}
