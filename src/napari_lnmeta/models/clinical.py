"""Clinical data for MIL fusion (seed 002, "DL-CNB+C"): a fitted encoder and CSV reading.

Seed 002 standardises numeric clinical values (mean 0, unit variance over the training
cohort), one-hot encodes categorical ones (no order between categories), repeats the
resulting vector 10 times (the image features are much longer) and concatenates it with
the attention-pooled image features. :class:`ClinicalEncoder` holds the fitted part (means,
standard deviations, categories) as JSON, stored in the MIL model file, so inference
encodes exactly like training; the repetition and concatenation happen in the model
(:class:`napari_lnmeta.models.mil.MILModel`).

Nothing is guessed: a missing column, an empty value, a non-number in a numeric column or
a category not seen in training raises :class:`~napari_lnmeta.errors.InputError` naming
the slide, the column and what to do. No torch here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

#: values read as "missing"
MISSING = frozenset({"", "na", "n/a", "nan", "none", "null", "?", "-"})
#: columns that name the slide in a clinical / cohort CSV
KEY_COLUMNS = ("slide", "slide_id", "image", "file", "name", "patient", "patient_id")


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return str(v).strip().lower() in MISSING


@dataclass
class ClinicalEncoder:
    """Fitted clinical encoding: numeric standardisation + categorical one-hot.

    Attributes
    ----------
    numeric
        Column -> ``[mean, std]`` of the training cohort.
    categorical
        Column -> categories in one-hot order (sorted).
    repeat
        How often the model repeats the encoded vector before concatenation (seed 002: 10).
    """

    numeric: dict[str, list[float]] = field(default_factory=dict)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    repeat: int = 10

    @property
    def columns(self) -> list[str]:
        return list(self.numeric) + list(self.categorical)

    @property
    def dim(self) -> int:
        """Length of one encoded vector (before the repetition)."""
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    @property
    def feature_names(self) -> list[str]:
        return list(self.numeric) + [f"{k}={c}" for k, cats in self.categorical.items()
                                     for c in cats]

    # -- fitting ---------------------------------------------------------------------------
    @classmethod
    def fit(cls, rows: Sequence[Mapping[str, Any]], *, numeric: Sequence[str] = (),
            categorical: Sequence[str] = (), repeat: int = 10,
            names: Sequence[str] | None = None, source: str = "clinical data") -> ClinicalEncoder:
        """Fit on the training cohort's rows (``names`` label them in messages)."""
        if not numeric and not categorical:
            raise InputError(f"{source}: no clinical columns given (numeric or categorical)")
        both = set(numeric) & set(categorical)
        if both:
            raise InputError(f"{source}: columns {sorted(both)} are both numeric and categorical")
        if not rows:
            raise InputError(f"{source}: no rows to fit the clinical encoder on")
        names = list(names) if names is not None else [f"row {i + 1}" for i in range(len(rows))]
        num: dict[str, list[float]] = {}
        for col in numeric:
            vals = np.array([_number(r, col, n, source) for r, n in zip(rows, names, strict=True)])
            std = float(vals.std())
            num[col] = [float(vals.mean()), std if std > 0 else 1.0]
        cat: dict[str, list[str]] = {}
        for col in categorical:
            vals = [_category(r, col, n, source) for r, n in zip(rows, names, strict=True)]
            cat[col] = sorted(set(vals))
        return cls(numeric=num, categorical=cat, repeat=int(repeat))

    # -- encoding --------------------------------------------------------------------------
    def transform(self, row: Mapping[str, Any], *, name: str = "slide",
                  source: str = "clinical data") -> np.ndarray:
        """The ``(dim,)`` float32 vector of one slide's clinical values."""
        out = np.zeros(self.dim, dtype=np.float32)
        k = 0
        for col, (mean, std) in self.numeric.items():
            out[k] = (_number(row, col, name, source, self.columns) - mean) / std
            k += 1
        for col, cats in self.categorical.items():
            v = _category(row, col, name, source, self.columns)
            if v not in cats:
                raise InputError(f"{source}: {name}: {col}={v!r} was not seen in training "
                                 f"(known: {', '.join(cats)}); correct the value or retrain "
                                 "with data that contains it")
            out[k + cats.index(v)] = 1.0
            k += len(cats)
        return out

    def transform_many(self, rows: Sequence[Mapping[str, Any]], names: Sequence[str], *,
                       source: str = "clinical data") -> np.ndarray:
        return np.stack([self.transform(r, name=n, source=source)
                         for r, n in zip(rows, names, strict=True)]) if rows else \
            np.zeros((0, self.dim), np.float32)

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"numeric": {k: list(v) for k, v in self.numeric.items()},
                "categorical": {k: list(v) for k, v in self.categorical.items()},
                "repeat": self.repeat}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> ClinicalEncoder | None:
        if not d:
            return None
        return cls(numeric={k: [float(a), float(b)] for k, (a, b) in d.get("numeric", {}).items()},
                   categorical={k: [str(c) for c in v] for k, v in d.get("categorical", {}).items()},
                   repeat=int(d.get("repeat", 10)))


def _value(row: Mapping[str, Any], col: str, name: str, source: str,
           needed: Sequence[str] | None) -> Any:
    if col not in row:
        need = f" (the model needs: {', '.join(needed)})" if needed else ""
        raise InputError(f"{source}: {name}: clinical column {col!r} is missing{need}")
    v = row[col]
    if _missing(v):
        raise InputError(f"{source}: {name}: clinical value {col!r} is empty/missing; MIL with "
                         "clinical fusion needs every value (fill it in, or use a model "
                         "trained without clinical data)")
    return v


def _number(row: Mapping[str, Any], col: str, name: str, source: str,
            needed: Sequence[str] | None = None) -> float:
    v = _value(row, col, name, source, needed)
    try:
        x = float(str(v).strip())
    except ValueError:
        raise InputError(f"{source}: {name}: clinical column {col!r} is numeric but holds "
                         f"{v!r}") from None
    if not math.isfinite(x):
        raise InputError(f"{source}: {name}: clinical value {col!r} is not finite ({v!r})")
    return x


def _category(row: Mapping[str, Any], col: str, name: str, source: str,
              needed: Sequence[str] | None = None) -> str:
    return str(_value(row, col, name, source, needed)).strip()


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------
def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a comma/semicolon/tab separated file with a header (values stripped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"{path}: cannot read CSV ({e.strerror or e})") from e
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) < 2:
        raise InputError(f"{path}: the CSV needs a header line and at least one row")
    delim = "\t" if "\t" in lines[0] else ";" if ";" in lines[0] and "," not in lines[0] else ","
    reader = csv.reader(lines, delimiter=delim)
    header = [h.strip() for h in next(reader)]
    if len(set(header)) != len(header):
        raise InputError(f"{path}: duplicate column names in the header")
    rows = []
    for i, r in enumerate(reader, start=2):
        if len(r) != len(header):
            raise InputError(f"{path}: line {i}: {len(r)} values for {len(header)} columns")
        rows.append({h: v.strip() for h, v in zip(header, r, strict=True)})
    return rows


def key_column(header: Iterable[str]) -> str | None:
    """The column naming the slide, if any (``slide``, ``image``, ``file``...)."""
    low = {h.lower(): h for h in header}
    return next((low[k] for k in KEY_COLUMNS if k in low), None)


def slide_names(value: str) -> set[str]:
    """Ways a CSV may name a slide: path, file name, name without suffixes."""
    p = Path(value)
    return {value, p.name, p.stem, p.name.split(".")[0]}


def clinical_row(path: str | Path, slide: str | None = None) -> dict[str, str]:
    """The clinical row of ``slide`` in a CSV (or its only row).

    The slide is matched on a ``slide``/``image``/``file``/``name`` column by full name,
    file name or name without suffixes.
    """
    path = Path(path)
    rows = read_csv_rows(path)
    key = key_column(rows[0])
    if slide is not None and key is not None:
        want = slide_names(slide)
        hits = [r for r in rows if slide_names(r[key]) & want]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise InputError(f"{path}: no row for slide {Path(slide).name!r} in column {key!r}")
        raise InputError(f"{path}: {len(hits)} rows for slide {Path(slide).name!r}")
    if len(rows) == 1:
        return rows[0]
    raise InputError(f"{path}: {len(rows)} rows and no slide column to choose one "
                     f"(add a 'slide' column)")


__all__ = ["KEY_COLUMNS", "MISSING", "ClinicalEncoder", "clinical_row", "key_column",
           "read_csv_rows", "slide_names"]
