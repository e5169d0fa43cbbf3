"""Data configuration shared by every stage (what to read, how to clean, how to split)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmwright.config import ConfigError, opt


@dataclass
class CleanConfig:
    normalize: Literal["NFC", "NFKC", "none"] = opt("NFC", "unicode normalisation form")
    whitespace: bool = opt(True, "strip ends and collapse runs of spaces/tabs (newlines kept)")
    min_chars: int = opt(1, "drop records whose text is shorter than this")
    max_chars: int = opt(1_000_000, "drop records whose text is longer than this")
    dedup: bool = opt(True, "drop exact duplicates (after normalisation)")
    near_dedup: bool = opt(False, "drop near-duplicates (MinHash over character shingles)")
    near_dedup_threshold: float = opt(0.85, "estimated Jaccard similarity at or above which a record is a near-duplicate")

    def check(self) -> None:
        if self.min_chars < 0 or self.max_chars < max(1, self.min_chars):
            raise ConfigError(f"data.clean.min_chars = {self.min_chars} and data.clean.max_chars = {self.max_chars}: "
                              "need 0 <= min_chars <= max_chars and max_chars >= 1, or every record is dropped")


@dataclass
class DataConfig:
    path: list[str] = opt([], "training data: files (.txt .jsonl .json .csv .parquet), folders, globs, "
                              "a `lmwright data prepare` output folder, a datasets save_to_disk folder, or a data "
                              "set of a LLaMA-Factory registry: <dir>/dataset_info.json:<name> (see "
                              "docs/data-formats.md)")
    format: str = opt("text", "record format: text, alpaca, messages (also sharegpt, tool calls), preference, "
                              "kto (unpaired, labelled replies), classification, pairs")
    txt_mode: Literal["line", "paragraph", "file"] = opt("line", ".txt files: one record per non-empty line, "
                                                          "per blank-line separated paragraph, or per file")
    columns: dict = opt({}, "rename source columns to the format's fields, e.g. {review: text, stars: label}")
    val_path: list[str] = opt([], "validation data (same kinds of paths); default: split off val_fraction")
    val_fraction: float = opt(0.05, "share of records held out for validation when val_path is empty")
    split_seed: int = opt(0, "seed of the deterministic train/validation split")
    max_records: int | None = opt(None, "read at most this many records (after cleaning)")
    on_error: Literal["raise", "skip"] = opt("raise", "malformed record: stop with an error, or skip and count it")
    clean: CleanConfig = opt(CleanConfig(), "cleaning rules")

    def check(self) -> None:
        for src, dst in self.columns.items():
            if not (_name(src) and _name(dst)):
                raise ConfigError(f"data.columns: {src!r}: {dst!r} must map a source column to a field name, e.g. "
                                  "{review: text}")
        self.columns = {str(k): str(v) for k, v in self.columns.items()}  # csv headers are strings
        # `data.val_path=` on the command line clears the list (an empty path would read the current folder)
        self.path = [p for p in self.path if p.strip()]
        self.val_path = [p for p in self.val_path if p.strip()]


def _name(x: object) -> bool:
    return isinstance(x, (str, int)) and not isinstance(x, bool) and str(x).strip() != ""
