"""``TextTable``: labelled strings from a CSV, TSV or JSON Lines file."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch.utils.data import Dataset

from graft.data.labels import check_classes, natural_order, need_two
from graft.errors import DataError

__all__ = ["TextTable"]


class TextTable(Dataset):
    """Labelled strings from a CSV file or a JSON Lines file (chosen by the suffix).

    ``.csv`` (``.tsv`` for tab-separated) needs a header row; ``.jsonl`` / ``.ndjson`` holds
    one JSON object per line. Items are ``(text, label)``.

    Args:
        path: The file.
        text_column: The column (or JSON key) holding the text.
        label_column: The column holding the class name of each row.
        classes: The class names, in label order. ``None``: the distinct labels in the file,
            sorted (numerically when all are integers).

    Raises:
        DataError: the file is missing, empty or malformed; a column is missing (the message
            lists the available ones); a label is not one of ``classes`` (the message names
            the first few and their lines); fewer than two classes.
    """

    def __init__(self, path: str | os.PathLike[str], text_column: str = "text",
                 label_column: str = "label", classes: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.text_column = text_column
        self.label_column = label_column
        suffix = self.path.suffix.lower()
        if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
            raise DataError(f"TextTable reads .csv, .tsv, .jsonl or .ndjson files, got "
                            f"{self.path.name!r}; rename it or convert it")
        if not self.path.is_file():
            raise DataError(f"text table {self.path} does not exist")
        rows = (self._read_jsonl() if suffix in (".jsonl", ".ndjson")
                else self._read_csv("\t" if suffix == ".tsv" else ","))
        if not rows:
            raise DataError(f"text table {self.path} has no rows; it needs at least one "
                            f"row with {text_column!r} and {label_column!r}")
        self.texts: list[str] = [text for _, text, _ in rows]
        names = [label for _, _, label in rows]
        if classes is None:
            self.classes = natural_order(names)
            need_two(self.classes, f"column {label_column!r} of {self.path}")
        else:
            self.classes = check_classes(classes, f"TextTable({str(self.path)!r})")
        index = {name: i for i, name in enumerate(self.classes)}
        bad = [(line, label) for line, _, label in rows if label not in index]
        if bad:
            shown = ", ".join(f"{label!r} (line {line})" for line, label in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"{self.path}: {len(bad)} rows have labels that are not among the "
                            f"classes {self.classes}: {shown}{more}; fix the labels or add "
                            "them to classes")
        self.labels: list[int] = [index[name] for name in names]
        self.lines: list[int] = [line for line, _, _ in rows]

    def _row(self, record: Mapping[str, Any], line: int,
             columns: Sequence[str]) -> tuple[int, str, str]:
        missing = [c for c in (self.text_column, self.label_column) if c not in record]
        if missing:
            raise DataError(f"{self.path} line {line} has no column {missing[0]!r}; the "
                            f"available columns are {list(columns)}; pass text_column=... "
                            "and label_column=...")
        text, label = record[self.text_column], record[self.label_column]
        if not isinstance(text, str):
            raise DataError(f"{self.path} line {line}: {self.text_column!r} must be a string, "
                            f"got {type(text).__name__} {text!r}"[:300])
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise DataError(f"{self.path} line {line}: {self.label_column!r} must be a class "
                            f"name (string or integer), got {label!r}"[:300])
        return line, text, str(label)

    def _read_csv(self, delimiter: str) -> list[tuple[int, str, str]]:
        rows = []
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f, delimiter=delimiter)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"text table {self.path} is empty; it needs a header row "
                                    f"naming the columns {self.text_column!r} and "
                                    f"{self.label_column!r}")
                header = [h.strip() for h in header]
                missing = [c for c in (self.text_column, self.label_column) if c not in header]
                if missing:
                    raise DataError(f"{self.path} has no column {missing[0]!r}; the available "
                                    f"columns are {header}; pass text_column=... and "
                                    "label_column=...")
                for values in reader:
                    line = reader.line_num
                    if not any(v.strip() for v in values):
                        continue  # blank line
                    if len(values) != len(header):
                        raise DataError(f"{self.path} line {line} has {len(values)} fields "
                                        f"but the header has {len(header)} ({header}); quote "
                                        "fields that contain the delimiter")
                    rows.append(self._row(dict(zip(header, values)), line, header))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text ({exc}); re-save it as UTF-8") \
                from None
        except csv.Error as exc:
            raise DataError(f"{self.path} is not valid CSV ({exc})") from None
        return rows

    def _read_jsonl(self) -> list[tuple[int, str, str]]:
        rows = []
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                for line, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        record = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{self.path} line {line} is not valid JSON "
                                        f"({exc.msg} at column {exc.colno})") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{self.path} line {line} is a JSON "
                                        f"{type(record).__name__}; each line must be an object "
                                        f"like {{\"{self.text_column}\": ..., "
                                        f"\"{self.label_column}\": ...}}")
                    rows.append(self._row(record, line, list(record)))
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.path} is not UTF-8 text ({exc}); re-save it as UTF-8") \
                from None
        return rows

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]

    def __repr__(self) -> str:
        return f"TextTable({str(self.path)!r}, {len(self)} rows, classes={self.classes})"
