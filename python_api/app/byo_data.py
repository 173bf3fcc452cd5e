"""User data for ``lora-kernels train``: one file or a ``datasets`` directory -> texts (and labels) -> seeded splits.

Formats, by file name: ``.csv``, ``.tsv``, ``.jsonl`` / ``.json`` (JSON lines), ``.parquet`` (read with pandas),
``.txt`` (one example per non-empty line, column ``text``), and a directory written by ``datasets``'
``save_to_disk`` (read with ``datasets.load_from_disk``; a ``DatasetDict`` contributes its ``train`` split, or
its only split). Every problem with the input raises :class:`BadInput` with one line naming the file, column
or argument (the command line turns it into exit code 2).

Columns: ``--text-column`` defaults to the first of ``text, sentence, content, review, document`` present, else
the only string column; ``--label-column`` to ``label`` / ``labels`` when present. A label column makes the task
``classify``; text alone makes it ``causal-lm``.

Splits (no ``--eval-data``): one seeded permutation (``torch.Generator``) per class for classification (so
each split keeps the class proportions), one for the whole table for causal LM; ``val_frac`` and ``test_frac``
of the rows (at least one each) go to validation and test. With ``--eval-data`` that file is the test split
and the validation split is cut from the training file the same way.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

TEXT_DEFAULTS = ("text", "sentence", "content", "review", "document")
LABEL_DEFAULTS = ("label", "labels")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".txt": "text"}


# a label column with more distinct values than this, some of them fractional numbers, is a regression target
CONTINUOUS_LABELS = 20


class BadInput(ValueError):
    """Bad user input (file, column, argument): one line, exit code 2, nothing written."""


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type when it has none."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


@dataclass
class Examples:
    """Texts and, for classification, integer labels (index into ``label_names``)."""
    texts: list[str]
    labels: list[int] | None = None
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: list[int]) -> "Examples":
        return Examples([self.texts[i] for i in idx], None if self.labels is None else [self.labels[i] for i in idx],
                        self.label_names)


def sha256_files(files: list[tuple[str, str]]) -> str:
    """sha256 over ``(name, path)`` pairs in the given order: each name, then the file's bytes (1 MiB pieces)."""
    import hashlib

    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_format(path: str, arg: str = "--data") -> str:
    if not os.path.exists(path):
        raise BadInput(f"{arg}: {path}: no such file or directory")
    if os.path.isdir(path):
        return "datasets"
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise BadInput(f"{arg}: {path}: unknown format {ext or '(no extension)'!r}; use one of "
                       f"{', '.join(sorted(FORMATS))} or a datasets save_to_disk directory")
    if os.path.getsize(path) == 0:
        raise BadInput(f"{arg}: {path}: file is empty")
    return FORMATS[ext]


def read_table(path: str, arg: str = "--data"):
    """The file or ``datasets`` directory at ``path`` as a pandas DataFrame."""
    return _read(path, arg)[0]


def _read(path: str, arg: str):
    """``(table, format, raw header or None)``; the header is the CSV / TSV file's own first row (pandas renames
    a repeated name, ``label`` -> ``label.1``, so repeats are found there). Text formats are read as UTF-8 with
    an optional byte-order mark (``utf-8-sig``: Windows Notepad and Excel write one); column names lose surrounding
    whitespace (``text, label`` -> ``text``, ``label``) with a warning."""
    import pandas as pd

    fmt = file_format(path, arg)
    header = None
    try:
        if fmt == "datasets":
            df = _read_datasets_dir(path, arg)
        elif fmt in ("csv", "tsv"):
            sep = "," if fmt == "csv" else "\t"
            header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False,
                                 encoding="utf-8-sig").iloc[0].tolist()
            df = pd.read_csv(path, sep=sep, keep_default_na=True, encoding="utf-8-sig")
        elif fmt == "jsonl":
            # a .json file may hold one JSON array of records instead of one record per line; dtype=False keeps
            # JSON's own types (pandas would otherwise turn the strings "01" and "1" into the number 1)
            df = pd.read_json(path, lines=not _starts_with(path, "["), dtype=False, encoding="utf-8-sig")
        elif fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            with open(path, encoding="utf-8-sig") as f:
                df = pd.DataFrame({"text": [ln.rstrip("\n") for ln in f if ln.strip()]})
    except BadInput:
        raise
    except pd.errors.EmptyDataError:
        raise BadInput(f"{arg}: {path}: file is empty") from None
    except Exception as e:  # a parser's own message says what is wrong where
        msg = first_line(e)
        raise BadInput(f"{arg}: {path}: cannot read as {fmt}: {msg}") from None
    if header is not None and len(header) == 1 and len(df):   # one column: a file separated by another character?
        other = [c for c in (";", "|", "\t", ",") if c != sep and c in header[0] and c in str(df.iloc[0, 0])]
        if other:
            raise BadInput(f"{arg}: {path}: one column {header[0]!r}: the file looks {other[0]!r}-separated, but a "
                           f".{fmt} file is read as {'comma' if sep == ',' else 'tab'}-separated; save it with "
                           f"{'commas' if sep == ',' else 'tabs'}" + (" (or as .tsv)" if other[0] == "\t" else ""))
    if header is not None:
        seen = set()
        for name in header:
            if name and name in seen:
                raise BadInput(f"{arg}: {path}: column {name!r} appears more than once in the header; rename "
                               "or remove the repeats")
            seen.add(name)
    names = [str(c) for c in df.columns]
    padded = [c for c in names if c != c.strip()]
    if padded:
        stripped: dict[str, str] = {}
        for c in names:
            if c.strip() in stripped:
                raise BadInput(f"{arg}: {path}: columns {stripped[c.strip()]!r} and {c!r} are both column "
                               f"{c.strip()!r} once surrounding whitespace is removed; rename one")
            stripped[c.strip()] = c
        warnings.warn(f"{arg}: {path}: surrounding whitespace removed from column names {padded}", stacklevel=3)
        names = [c.strip() for c in names]
    if len(df) == 0:
        raise BadInput(f"{arg}: {path}: no rows (columns found: {names})")
    df.columns = names
    return df, fmt, header


def _raw_strings(path: str, fmt: str, df, header, columns: list[str]):
    """``columns`` of a CSV / TSV file as the strings in the file (no number parsing, ``NA`` / ``None`` kept as
    text, an empty cell ''), or None for other formats or when the rows do not line up with ``df``'s."""
    import pandas as pd

    if fmt not in ("csv", "tsv") or header is None or not isinstance(df.index, pd.RangeIndex) \
            or len(header) != len(df.columns) or any(h.strip() not in ("", c) for h, c in zip(header, df.columns)):
        return None   # pandas took a column as the index (a header one name short), or named columns itself
    pos = [list(df.columns).index(c) for c in columns]
    try:
        raw = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                          usecols=sorted(set(pos)), encoding="utf-8-sig")
    except Exception:   # the first read succeeded; the checks this feeds are skipped rather than fail the run
        return None
    if len(raw) != len(df):
        return None
    by_pos = dict(zip(sorted(set(pos)), raw.columns))
    return {c: raw[by_pos[p]].tolist() for c, p in zip(columns, pos)}


def _starts_with(path: str, char: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith(char)


def _read_datasets_dir(path: str, arg: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        msg = first_line(e)
        raise BadInput(f"{arg}: {path}: not a datasets save_to_disk directory ({msg})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise BadInput(f"{arg}: {path}: DatasetDict with splits {list(ds)} and no 'train' split")
    return ds.to_pandas()


def _pick(columns: list[str], wanted: str | None, defaults, what: str, path: str, arg: str) -> str | None:
    if wanted is not None:
        if wanted not in columns and wanted.strip() in columns:   # column names lose surrounding whitespace on load
            wanted = wanted.strip()
        if wanted not in columns:
            near = [c for c in columns if c.lower() == wanted.lower()]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise BadInput(f"{arg}: {path}: no column {wanted!r} ({what}); columns found: {columns}{hint}")
        return wanted
    return next((c for c in defaults if c in columns), None)


def resolve_columns(df, path: str, text_column: str | None, label_column: str | None, task: str | None,
                    arg: str = "--data") -> tuple[str, str | None, str]:
    """``(text column, label column or None, task)`` for a table, with the defaults of the module docstring."""
    cols = list(df.columns)
    text = _pick(cols, text_column, TEXT_DEFAULTS, "--text-column", path, arg)
    if text is None:
        from pandas.api.types import is_string_dtype

        # object (pandas < 3) or the str dtype pandas 3 gives text columns by default
        strings = [c for c in cols if is_string_dtype(df[c].dtype)]
        if len(strings) != 1:
            raise BadInput(f"{arg}: {path}: cannot tell the text column; pass --text-column (columns found: {cols})")
        text = strings[0]
    if task == "causal-lm":
        if label_column is not None:
            raise BadInput("--label-column: not used with --task causal-lm")
        return text, None, task
    label = _pick(cols, label_column, LABEL_DEFAULTS, "--label-column", path, arg)
    if task == "classify" and label is None:
        raise BadInput(f"{arg}: {path}: --task classify needs a label column; pass --label-column "
                       f"(columns found: {cols})")
    if label == text:
        raise BadInput(f"--label-column: {label!r} is also the text column")
    return text, label, ("classify" if label is not None else "causal-lm")


def _texts(df, column: str, path: str, arg: str, raw: list[str] | None = None) -> list[str]:
    """``raw``: the column's strings as in a CSV / TSV file; a cell pandas reads as missing but that holds text
    (``NA``, ``None``, ``null``, ``nan``: pandas' default missing-value spellings) keeps that text."""
    col = df[column]
    if raw is not None:
        na = col.isna().tolist()
        keep = [i for i, v in enumerate(raw) if na[i] and v.strip()]
        if keep:
            col = col.astype(object)
            for i in keep:
                col.iloc[i] = raw[i]
    missing = col.isna().to_numpy().nonzero()[0]
    if len(missing):
        raise BadInput(f"{arg}: {path}: column {column!r} has {len(missing)} missing values "
                       f"(first at row {int(missing[0])}); fill or drop them")
    not_str = [i for i, v in enumerate(col.tolist()) if not isinstance(v, str)]
    if len(not_str) == len(col):
        raise BadInput(f"{arg}: {path}: column {column!r} holds no text (e.g. {col.iloc[0]!r}); "
                       f"pass the text column with --text-column")
    if not_str:
        warnings.warn(f"{path}: {len(not_str)} non-text values in column {column!r} (first at row {not_str[0]}: "
                      f"{col.iloc[not_str[0]]!r}) converted to text", stacklevel=2)
    return [v if isinstance(v, str) else str(v) for v in col.tolist()]


def _label_values(df, column: str, path: str, arg: str) -> list:
    col = df[column]
    missing = col.isna().to_numpy().nonzero()[0]
    if len(missing):
        raise BadInput(f"{arg}: {path}: label column {column!r} has {len(missing)} missing values "
                       f"(first at row {int(missing[0])})")
    values, stripped = [], None
    for i, v in enumerate(col.tolist()):
        if isinstance(v, (list, tuple, dict, set)) or getattr(v, "ndim", 0) > 0:   # JSON lists / dicts, arrays
            shown = v.tolist() if hasattr(v, "tolist") else v
            raise BadInput(f"{arg}: {path}: label column {column!r} holds a {type(shown).__name__} at row {i} "
                           f"({shown!r}): one class label per row is needed (multi-label classification is not "
                           "supported)")
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, float) and v.is_integer():
            v = int(v)   # 1.0 (a float column, JSON written by pandas) is the class 1, as in an integer file
        if isinstance(v, str):
            # " pos" and "pos" are one class (a CSV space after the comma, a stray tab): surrounding whitespace goes
            if v != v.strip():
                stripped = stripped or (v, v.strip())
                v = v.strip()
            if not v:
                raise BadInput(f"{arg}: {path}: label column {column!r} has an empty label (row {i})")
        values.append(v)
    if stripped:
        warnings.warn(f"{arg}: {path}: surrounding whitespace removed from labels in column {column!r} "
                      f"(e.g. {stripped[0]!r} -> {stripped[1]!r})", stacklevel=3)
    return values


def _merged_spellings(values: list, raw: list[str], column: str, path: str, arg: str) -> None:
    """Warns when one class is spelled two ways in a CSV / TSV file: pandas reads ``01`` and ``1`` (or ``1`` and
    ``1.0``) as one number, so they are one class. Kept so (numeric label columns stay numbers: the same class in
    every file, numeric order, the continuous-label check), but said."""
    spellings: dict[str, set[str]] = {}
    for v, r in zip(values, raw):
        spellings.setdefault(str(v), set()).add(r.strip())
    merged = [(k, sorted(v)) for k, v in spellings.items() if len(v) > 1]
    if merged:
        k, v = merged[0]
        warnings.warn(f"{arg}: {path}: labels {v} in column {column!r} are read as the same number, one class "
                      f"({k!r}){f' ({len(merged)} such classes)' if len(merged) > 1 else ''}; if they are "
                      "different classes, give them names that are not numbers", stacklevel=3)


def _sort_key(v):
    """Numbers, and strings that spell an integer (JSON's "0" … "11"), in numeric order; other labels after, by text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v, "")
    s = str(v)
    return (0, int(s), s) if re.fullmatch(r"[+-]?\d+", s) else (1, 0, s)


def load_examples(path: str, text_column: str | None = None, label_column: str | None = None,
                  task: str | None = None, label_names: list[str] | None = None,
                  arg: str = "--data") -> tuple[Examples, dict]:
    """Reads ``path`` and returns ``(examples, info)``; ``info`` has the columns and the task.

    ``label_names``: the training labels when reading evaluation data (a label not among them is refused)."""
    df, fmt, header = _read(path, arg)
    text, label, task = resolve_columns(df, path, text_column, label_column, task, arg)
    raw = _raw_strings(path, fmt, df, header, [text] if label is None else [text, label]) or {}
    texts = _texts(df, text, path, arg, raw.get(text))
    info = {"path": os.path.abspath(path), "rows": len(df), "text_column": text, "label_column": label, "task": task}
    if label is None:
        return Examples(texts), info
    values = _label_values(df, label, path, arg)
    if label in raw:
        _merged_spellings(values, raw[label], label, path, arg)
    if label_names is None:
        # one class per label text: 1 and "1" (a column of mixed ints and strings) are the same class
        uniq = sorted({str(v): v for v in values}.values(), key=_sort_key)
        if len(uniq) < 2:
            raise BadInput(f"{arg}: {path}: label column {label!r} has one class ({uniq[0]!r}); "
                           "classification needs at least two")
        fractional = [v for v in uniq if isinstance(v, float) and not float(v).is_integer()]
        if fractional and len(uniq) > CONTINUOUS_LABELS:
            raise BadInput(f"{arg}: {path}: label column {label!r} looks continuous ({len(uniq)} distinct numeric "
                           f"values such as {fractional[0]!r}): classification needs class labels (regression is "
                           "not supported)")
        label_names = [str(v) for v in uniq]
        folded: dict[str, list[str]] = {}
        for n in label_names:
            folded.setdefault(n.casefold(), []).append(n)
        same = [v for v in folded.values() if len(v) > 1]
        if same:
            warnings.warn(f"{arg}: {path}: labels {same[0]} in column {label!r} differ only in letter case: they "
                          "are kept as separate classes", stacklevel=2)
    index = {name: i for i, name in enumerate(label_names)}
    unseen = sorted({str(v) for v in values} - set(index))
    if unseen:
        raise BadInput(f"{arg}: {path}: labels {unseen[:8]} in column {label!r} never occur in the training data "
                       f"(training labels: {label_names[:8]})")
    return Examples(texts, [index[str(v)] for v in values], list(label_names)), info


def _cut(n: int, frac: float) -> int:
    return max(1, int(math.floor(n * frac + 0.5)))


def split(data: Examples, val_frac: float, test_frac: float, seed: int, with_test: bool = True
          ) -> dict[str, Examples]:
    """Seeded train / validation (/ test) split, stratified by label when there are labels."""
    gen = torch.Generator().manual_seed(seed)
    if data.labels is None:
        groups = [list(range(len(data)))]
    else:
        groups = [[i for i, y in enumerate(data.labels) if y == c] for c in range(len(data.label_names))]
    parts = {"train": [], "validation": [], "test": []}
    for g in groups:
        if not g:
            continue
        perm = [g[i] for i in torch.randperm(len(g), generator=gen).tolist()]
        n_test = _cut(len(g), test_frac) if with_test else 0
        n_val = _cut(len(g), val_frac)
        while len(g) - n_test - n_val < 1 and max(n_test, n_val) > 1:   # fractions near 1/2: keep a training row
            n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
        if len(g) - n_test - n_val < 1:   # a tiny class keeps its example(s) for training
            n_test, n_val = (0, 0) if len(g) < 3 else (n_test, n_val)
        parts["test"] += perm[:n_test]
        parts["validation"] += perm[n_test:n_test + n_val]
        parts["train"] += perm[n_test + n_val:]
    for k in parts:   # interleave the classes again (a class-ordered split would give one-class batches)
        order = torch.randperm(len(parts[k]), generator=gen).tolist()
        parts[k] = [parts[k][i] for i in order]
    need = ("train", "validation", "test") if with_test else ("train", "validation")
    small = [k for k in need if not parts[k]]
    if small:
        raise BadInput(f"--data: {len(data)} rows are too few for train / validation / test splits "
                       f"(empty: {small}); add rows or pass --eval-data")
    out = {k: data.take(parts[k]) for k in need}
    return out
