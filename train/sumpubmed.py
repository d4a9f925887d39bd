"""SumPubMed documents: loading (release layout or ``datasets``), cleaning, splitting and batching.

The release layout (``README.md`` of the release; the full release has 32,689 documents)::

    text/text_N.txt              the article, lower-cased, section headers on their own lines
    abstract/abstract_N.txt      the long abstract (background, results, conclusions)
    shorter_abstract/abst_N.txt  the short summary, one sentence a line

``N`` is the document id. Citations appear as ``<cit>`` and numbers as ``<dig>``.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TARGETS = {"abstract": ("abstract", "abstract_{}.txt"), "shorter_abstract": ("shorter_abstract", "abst_{}.txt")}
SPLITS = ("train", "validation", "test")
_SPLIT_PERCENT = (90, 5, 5)  # train / validation / test, by a hash of the document id
TABULAR_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}

_HEADER = re.compile(r"^[ \t]*[A-Z][A-Z &/,-]*[ \t]*$", re.MULTILINE)  # BACKGROUND, RESULTS AND DISCUSSION, ...
_CLOSING_MARKS = ".,;:)]"  # removing <cit> leaves "word ." and "word ,"
# Control characters (NUL, ...) other than tab and newline: never text, so they become spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass(frozen=True)
class Document:
    """One article and its reference summary, both cleaned."""

    doc_id: str
    text: str
    summary: str


@dataclass
class LoadReport:
    """How many documents were loaded and why the others were skipped."""

    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return f"loaded {self.loaded} documents; skipped {sum(self.skipped.values())} ({reasons})"


def clean(raw: str, keep_lines: bool = False) -> str:
    """Remove the release's artefacts: ``<cit>``, section headers, spacing, control characters; ``<dig>``
    becomes ``#``. A text without a single letter (NUL bytes, stray marks) cleans to ``""``.

    With ``keep_lines`` the text keeps one sentence or paragraph a line (for ROUGE-Lsum);
    otherwise it is one line.
    """
    text = _HEADER.sub("", _CONTROL.sub(" ", raw)).replace("<cit>", "").replace("<dig>", "#")
    # str methods rather than regexes here: several times faster on the full release
    text = "\n".join(filter(None, (" ".join(line.split()) for line in text.splitlines())))
    for mark in _CLOSING_MARKS:
        text = text.replace(" " + mark, mark)
    if not any(c.isalpha() for c in text):
        return ""
    return text if keep_lines else text.replace("\n", " ")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def load_release(folder: str | Path, target: str = "abstract") -> tuple[list[Document], LoadReport]:
    """Documents of a SumPubMed release folder, sorted by id, with a report of what was skipped.

    A document is skipped (and counted) when one of its three files is missing, empty after
    cleaning, or not UTF-8.

    Raises:
        FileNotFoundError: if the folder or its ``text`` subfolder does not exist.
        ValueError: if ``target`` is unknown or no document could be loaded.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    folder = Path(folder)
    if not (folder / "text").is_dir():
        raise FileNotFoundError(f"{folder} has no text/ folder: not a SumPubMed release (text/, abstract/, ...)")
    report = LoadReport()
    documents = []
    ids = sorted((p.stem.removeprefix("text_") for p in (folder / "text").glob("text_*.txt")), key=_id_order)
    for doc_id in ids:
        paths = [folder / "text" / f"text_{doc_id}.txt"] + [
            folder / sub / pattern.format(doc_id) for sub, pattern in TARGETS.values()
        ]
        if not all(p.is_file() for p in paths):
            report.skipped["missing files"] += 1
            continue
        texts = [_read(p) for p in paths]
        if any(t is None for t in texts):
            report.skipped["not UTF-8"] += 1
            continue
        text, *summaries = (clean(t, keep_lines=True) for t in texts)
        if not text or not all(summaries):
            report.skipped["empty"] += 1
            continue
        summary = summaries[list(TARGETS).index(target)]
        documents.append(Document(doc_id, text.replace("\n", " "), summary))
    report.loaded = len(documents)
    if not documents:
        raise ValueError(f"no SumPubMed documents could be loaded from {folder} ({report})")
    return documents, report


def _id_order(doc_id: str):
    return (0, int(doc_id), "") if doc_id.isdigit() else (1, 0, doc_id)


def load_table(
    source: str, target: str = "abstract", text_column: str = "text", summary_column: str | None = None
) -> tuple[list[Document], LoadReport]:
    """Documents from ``datasets.load_dataset``: a Hub id, or local parquet/JSON/CSV files or folder.

    Columns: ``text_column`` for the article and ``summary_column`` (default: ``target`` if the
    data has it, else ``summary``) for the reference. Rows with an empty text or summary are
    skipped and counted. Every split the source has is read; ``id`` (or the row number) names a row.
    """
    import datasets

    path = Path(source)
    if path.is_file() and path.suffix in TABULAR_SUFFIXES:
        loaded = datasets.load_dataset(TABULAR_SUFFIXES[path.suffix], data_files=str(path))
    elif path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in TABULAR_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} holds no parquet, JSON or CSV files and no SumPubMed release")
        loaded = datasets.load_dataset(TABULAR_SUFFIXES[Path(files[0]).suffix], data_files=files)
    elif source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source} does not exist")
    else:
        try:
            loaded = datasets.load_dataset(source)
        except Exception as exc:  # offline, or no such dataset
            raise FileNotFoundError(
                f"could not load {source!r} as a local path or a Hugging Face Hub dataset ({exc}); "
                "give a SumPubMed release folder or local parquet/JSON files"
            ) from exc
    report = LoadReport()
    documents = []
    for split_name, split in loaded.items():
        columns = split.column_names
        summary_key = summary_column or (target if target in columns else "summary")
        for needed in (text_column, summary_key):
            if needed not in columns:
                raise ValueError(f"{source} ({split_name}) has no column {needed!r}; its columns are {columns}")
        for row_number, row in enumerate(split):
            text = clean(row[text_column] or "")
            summary = clean(row[summary_key] or "", keep_lines=True)
            if not text or not summary:
                report.skipped["empty"] += 1
                continue
            doc_id = str(row["id"]) if "id" in columns else f"{split_name}-{row_number}"
            documents.append(Document(doc_id, text, summary))
    report.loaded = len(documents)
    if not documents:
        raise ValueError(f"no documents with text and summary in {source} ({report})")
    return documents, report


def load_documents(source: str | Path, target: str = "abstract") -> tuple[list[Document], LoadReport]:
    """A release folder (``text/``, ``abstract/``, ...) or anything :func:`load_table` reads."""
    if (Path(source) / "text").is_dir():
        return load_release(source, target)
    return load_table(str(source), target)


def split_of(doc_id: str) -> str:
    """``train``, ``validation`` or ``test``, from a hash of the id: the same on every machine."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
    if bucket < _SPLIT_PERCENT[0]:
        return "train"
    return "validation" if bucket < _SPLIT_PERCENT[0] + _SPLIT_PERCENT[1] else "test"


def select_split(documents: list[Document], split: str) -> list[Document]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [d for d in documents if split_of(d.doc_id) == split]


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a random order fixed by seed and epoch.

    Indices are shuffled, cut into pools of 50 batches, sorted by length within each pool and
    cut into batches; the batches are then shuffled. A pure function of its arguments, so a
    resumed run finds the same batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = 50 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [b for b in batches if len(b) == batch_size]
