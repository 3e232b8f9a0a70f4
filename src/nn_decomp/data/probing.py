"""Labelled texts for probing (SAEBench's sparse probing, run by `python -m nn_decomp.saebench`), built
offline from the State of the Union corpus, whose metadata gives every speech its president, party
and year; or read from a user's JSONL file.

A record is one paragraph of ≥ MIN_WORDS words, labelled by its speech; `group` is the speech, so a
split by group keeps every speech wholly in train or in test (a probe cannot pass by recognising a
speech it has seen). The built-in sets:
- `sotu_party`: Democratic vs Republican (the parties with enough speeches);
- `sotu_era`: five eras by year (1790–1859, 1860–1909, 1910–1959, 1960–1999, 2000–);
- `sotu_president`: the five presidents with the most speeches.
`labelled_split` balances classes (the same number of paragraphs per class, drawn without
replacement) and splits by group under a seed. These are the texts the dictionaries were trained on
(unsupervised); the probes are tested on speeches they were not trained on.
"""
from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from nn_decomp.config import UsageError
from nn_decomp.data.text import sotu_files

MIN_WORDS = 40
ERAS = [(1790, "1790-1859"), (1860, "1860-1909"), (1910, "1910-1959"), (1960, "1960-1999"), (2000, "2000-")]
N_PRESIDENTS = 5
BUILT_IN = ("sotu_party", "sotu_era", "sotu_president")


class Record(NamedTuple):
    text: str
    label: str
    group: str


def sotu_metadata() -> dict[str, dict[str, str]]:
    """fileid -> its row of the wheel's metadata.csv (year, president, party, ...)."""
    path = sotu_files()[0].parents[1] / "metadata.csv"
    with open(path, newline="") as f:
        return {row["fileid"]: row for row in csv.DictReader(f)}


def era(year: int) -> str:
    return [name for start, name in ERAS if year >= start][-1]


def sotu_records(name: str) -> list[Record]:
    """The paragraphs of every speech, labelled for the built-in set `name`."""
    meta = sotu_metadata()
    label_of = {"sotu_party": lambda m: m["party"], "sotu_era": lambda m: era(int(m["year"])),
                "sotu_president": lambda m: m["president_full"]}[name]
    records = []
    for path in sotu_files():
        paragraphs = [p.strip() for p in path.read_text().split("\n\n")]
        records += [Record(p, label_of(meta[path.stem]), path.stem) for p in paragraphs if len(p.split()) >= MIN_WORDS]
    if name == "sotu_party":
        return [r for r in records if r.label in ("Democratic", "Republican")]
    if name == "sotu_president":
        speeches = defaultdict(set)
        for r in records:
            speeches[r.label].add(r.group)
        top = sorted(speeches, key=lambda p: (-len(speeches[p]), p))[:N_PRESIDENTS]
        return [r for r in records if r.label in top]
    return records


def jsonl_records(path: Path) -> list[Record]:
    """A user's set: one JSON object per line with "text" and "label" ("group", e.g. the document, keeps
    related texts on one side of the split; default: each text its own group)."""
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("text") or row.get("label") in (None, ""):
            raise UsageError(f"probing set {path} line {i + 1} lacks a text or a label: every line needs "
                             '{"text": ..., "label": ...} (and optionally "group")')
        records.append(Record(row["text"], str(row["label"]), str(row.get("group", f"line{i}"))))
    return records


def load_records(spec: str) -> list[Record]:
    """A built-in set's name or a JSONL file's path."""
    if spec in BUILT_IN:
        return sotu_records(spec)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"probing set {spec!r} is neither a built-in ({', '.join(BUILT_IN)}) nor a JSONL file")
    return jsonl_records(path)


def labelled_split(records: list[Record], n_train: int, n_test: int, test_fraction: float, seed: int,
                   name: str) -> dict[str, dict[str, list[str]]]:
    """{"train": {label: texts}, "test": {label: texts}}: per label n_train texts from its train groups
    and n_test from its test groups (a seeded `test_fraction` of its groups, at least one)."""
    by_label: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_label[r.label][r.group].append(r.text)
    if len(by_label) < 2:
        raise UsageError(f"probing set {name} has {len(by_label)} label(s): a probe needs at least two classes")
    rng = random.Random(seed)
    split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for label in sorted(by_label):
        groups = sorted(by_label[label])
        if len(groups) < 2:
            raise UsageError(f"probing set {name}: label {label!r} has one group, so no split keeps train and "
                             "test apart: give it texts from more groups, or drop it")
        rng.shuffle(groups)
        n_test_groups = max(1, round(test_fraction * len(groups)))
        for part, part_groups, n in (("test", groups[:n_test_groups], n_test), ("train", groups[n_test_groups:], n_train)):
            texts = [t for g in part_groups for t in by_label[label][g]]
            if len(texts) < n:
                raise UsageError(f"probing set {name}: label {label!r} has {len(texts)} {part} texts, fewer than "
                                 f"the {n} asked: lower probe_{part}_per_class")
            split[part][label] = rng.sample(texts, n)
    return split
