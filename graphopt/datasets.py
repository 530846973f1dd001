"""Building pass contexts: the data a pipeline calibrates, trains and is verified on.

Text models calibrate, distill and are gated on text split three ways by content hash
(:func:`graphopt.data.split`): training (calibration batches, distillation texts),
verification (what the budget is measured on) and held-out (what reports and gates quote,
and what no pass sees). The text is the standard library's (:func:`graphopt.data.corpus`)
unless the user brings their own: :func:`load_texts` reads a text file (one text per
line), a JSONL field, a CSV column or a column of a Hugging Face ``datasets`` dataset saved
with ``save_to_disk``; :class:`TextSplits` splits it and :func:`text_context` tokenizes it
into a :class:`~graphopt.context.PassContext`.

:func:`program_context` serves programs without a tokenizer: seeded random inputs over the
program's declared dynamic shapes (two sizes per dynamic axis), one stream for calibration
and another, with other seeds, for verification.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt import data
from graphopt.context import Batch, PassContext
from graphopt.errors import ConfigError
from graphopt.inputs import dynamic_axis_names, padded_inputs, random_batches
from graphopt.program import Program

CALIBRATION_SEED = 7
VERIFICATION_SEED = 1_000_003
CALIBRATION_BATCHES = 8
VERIFICATION_BATCHES = 16  # batch sizes 1 and 3 alternating: 32 samples

STDLIB = "stdlib"
TEXT_FIELD = "text"
# The fewest texts of each part a build accepts: the budget on fewer than 32 real inputs is
# noise, and search halves the held-out part (4 a half is the least a mean can stand on).
MIN_TRAIN, MIN_VERIFICATION, MIN_HELDOUT = 8, 32, 8
CALIBRATION_BATCH_SIZE = 16
# Verification batch sizes cycle through these: the batch axis sees four sizes and the
# sequence axis (each batch padded to its longest text) as many widths.
VERIFICATION_BATCH_SIZES = (1, 3, 8, 4)
TEXT_SUFFIXES, JSONL_SUFFIXES, CSV_SUFFIXES = (".txt", ".text", ".md", ""), (".jsonl", ".ndjson"), (".csv", ".tsv")


# ---- programs without a tokenizer ----------------------------------------------------------
def program_context(program: Program, *, calibration_batches: int = CALIBRATION_BATCHES, verification_batches: int = VERIFICATION_BATCHES, **fields: Any) -> PassContext:
    """A context of seeded random inputs over ``program``'s dynamic shapes (its example
    first among the calibration batches); ``fields`` set the rest of the context."""
    shapes = runnable_shapes(program)
    calibration = [(tuple(program.args), dict(program.kwargs)), *random_batches(program, calibration_batches, seed=CALIBRATION_SEED, shapes=shapes)]
    verification = random_batches(program, verification_batches, seed=VERIFICATION_SEED, shapes=shapes)
    described = describe_shapes(shapes)
    padded = _runnable(program, padded_inputs(program, seed=VERIFICATION_SEED))
    if padded is not None:  # left padding and long padding runs: rows that see no key at all
        verification.append(padded[1:])
        described += f", and {padded[0]}"
    return PassContext(
        calibration=tuple(calibration),
        calibration_source=f"the example and {calibration_batches} seeded random batches ({describe_shapes(shapes)})",
        verification=tuple(verification),
        verification_source=f"{len(verification)} seeded random batches ({described})",
        **fields,
    )


def _runnable(program: Program, inputs: tuple[str, tuple, dict] | None) -> tuple[str, tuple, dict] | None:
    if inputs is None:
        return None
    try:
        program.run(inputs[1], inputs[2])
    except Exception:  # noqa: BLE001 - sizes outside the program's range: leave the set out
        return None
    return inputs


def runnable_shapes(program: Program) -> tuple[dict[str, int], ...] | None:
    """Two sizes of every dynamic axis (batch 1 and 3, other axes 7 and 19) that the program
    accepts; the example's own shape when it accepts neither or declares no dynamic axis."""
    axes = sorted({label for labels in dynamic_axis_names(program).values() for label in labels.values()})
    if not axes:
        return None
    candidates = ({a: (1 if a == "batch" else 7) for a in axes}, {a: (3 if a == "batch" else 19) for a in axes})
    kept = []
    for shape in candidates:
        try:
            (batch,) = random_batches(program, 1, seed=0, shapes=(shape,))
            program.run(*batch)
        except Exception:  # noqa: BLE001 - a size outside the program's range: leave it out
            continue
        kept.append(shape)
    return tuple(kept) or ({},)


def describe_shapes(shapes: tuple[dict[str, int], ...] | None) -> str:
    if not shapes or shapes == ({},):
        return "the example's shape"
    return "; ".join(", ".join(f"{k}={v}" for k, v in shape.items()) for shape in shapes)


# ---- the user's text -------------------------------------------------------------------------
def describe_source(source: str | os.PathLike, column: str | None = None) -> str:
    if os.fspath(source) == STDLIB:
        return "the standard-library text (graphopt.data.corpus('all'))"
    path = Path(source)
    if path.suffix.lower() in TEXT_SUFFIXES and not path.is_dir():
        return f"data file {path} (one text per line)"
    kind = "dataset folder" if path.is_dir() else "data file"
    what = "column" if path.is_dir() or path.suffix.lower() in CSV_SUFFIXES else "field"
    return f"{kind} {path} ({what} '{column or TEXT_FIELD}')"


def load_texts(source: str | os.PathLike, column: str | None = None) -> list[str]:
    """The non-empty texts of a text file (one per line), a JSONL file (field ``column``,
    default ``"text"``), a CSV/TSV file (that column) or a folder written by ``datasets``'
    ``save_to_disk`` (that column, every split), stripped, in file order."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"data source {path} does not exist (give '{STDLIB}', a .txt, .jsonl or .csv file, or a folder written by datasets' save_to_disk)")
    suffix = path.suffix.lower()
    if path.is_dir():
        values = _saved_dataset_column(path, column or TEXT_FIELD)
    elif suffix in JSONL_SUFFIXES:
        values = _jsonl_field(path, column or TEXT_FIELD)
    elif suffix in CSV_SUFFIXES:
        values = _csv_column(path, column or TEXT_FIELD, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in TEXT_SUFFIXES:
        if column is not None:
            raise ConfigError(f"data file {path} is plain text (one text per line): it has no field or column '{column}'")
        values = iter(_read(path).splitlines())
    else:
        raise ConfigError(f"data file {path}: unknown kind '{suffix}' (give a .txt file with one text per line, .jsonl, .csv, .tsv, or a datasets folder)")
    return [text.strip() for text in values if text and text.strip()]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"data file {path} is not UTF-8 text: {exc}") from None


def _jsonl_field(path: Path, name: str) -> Iterator[str]:
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data file {path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or name not in row:
            found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"data file {path}, line {number}: no field '{name}' (found: {found}); name the field with [data] field or --data-column")
        yield _text(row[name], f"data file {path}, line {number}, field '{name}'")


def _csv_column(path: Path, name: str, delimiter: str) -> Iterator[str]:
    reader = csv.DictReader(_read(path).splitlines(), delimiter=delimiter)
    if name not in (reader.fieldnames or []):
        raise ConfigError(f"data file {path}: no column '{name}' (columns: {', '.join(reader.fieldnames or []) or 'none'}); name it with [data] field or --data-column")
    for row in reader:
        yield row[name] or ""


def _saved_dataset_column(path: Path, name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data folder {path} is read with the Hugging Face datasets package, which is not installed: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(f"data folder {path} is not a dataset written by datasets' save_to_disk: {exc}") from None
    parts = [loaded[split] for split in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if name not in part.column_names:
            raise ConfigError(f"dataset folder {path}: no column '{name}' (columns: {', '.join(part.column_names)}); name it with [data] field or --data-column")
        for index, value in enumerate(part[name]):
            yield _text(value, f"dataset folder {path}, row {index}, column '{name}'")


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TextSplits:
    """Training, verification and held-out texts, disjoint by normalised content.

    ``train`` holds every training text (distillation trains on them; calibration takes
    ``calibration`` of them), ``verification`` and ``heldout`` the ones chosen (by hash, at
    most the counts asked for). ``available`` counts each part before that choice."""

    train: tuple[str, ...]
    verification: tuple[str, ...]
    heldout: tuple[str, ...]
    source: str = STDLIB
    description: str = ""
    calibration: int = 64
    available: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # texts dropped because their normalised form came earlier

    @classmethod
    def from_texts(
        cls, texts: Sequence[str], *, source: str = "given texts", description: str = "", calibration: int = 64, verification: int = 64,
        heldout: int = 64, fractions: Sequence[float] = data.DEFAULT_FRACTIONS, seed: int = 0, join: Callable[[Sequence[str]], list[str]] | None = None,
    ) -> TextSplits:
        """Split ``texts`` (near-duplicates collapsed), check every part is big enough, keep
        ``verification`` and ``heldout`` of their parts; the error names the source and counts.
        ``join`` (e.g. :func:`passage_joiner`) turns each part's texts into longer ones after the
        split, so no passage mixes parts."""
        first: dict[str, str] = {}
        for text in texts:
            first.setdefault(data.normalise(text), text)
        distinct = list(first.values())
        parts = data.split(distinct, fractions, seed)
        if join is not None:
            parts = data.Split(*(join(part) for part in parts))
        described = description or source
        _check_sizes(parts, described, len(distinct), fractions, need_heldout=heldout > 0)
        return cls(
            train=tuple(parts.train),
            verification=tuple(data.sample(parts.verification, verification, seed)),
            heldout=tuple(data.sample(parts.heldout, heldout, seed)) if heldout > 0 else (),
            source=source,
            description=described,
            calibration=min(calibration, len(parts.train)),
            available={part: len(getattr(parts, part)) for part in data.PARTS},
            duplicates=len(texts) - len(distinct),
        )

    def calibration_texts(self) -> list[str]:
        return data.sample(self.train, self.calibration)

    def counts(self) -> dict[str, int]:
        return {"calibration": self.calibration, "training": len(self.train), "verification": len(self.verification), "heldout": len(self.heldout)}

    def to_dict(self) -> dict[str, Any]:
        """What the report's and the manifest's ``data`` sections record."""
        return {"source": self.source, "description": self.description, "counts": self.counts(), "available": dict(self.available), "duplicates_dropped": self.duplicates}


def _check_sizes(parts: data.Split, source: str, total: int, fractions: Sequence[float], *, need_heldout: bool) -> None:
    minimums = {"train": MIN_TRAIN, "verification": MIN_VERIFICATION, "heldout": MIN_HELDOUT if need_heldout else 0}
    short = [part for part, least in minimums.items() if len(getattr(parts, part)) < least]
    if not short:
        return
    shares = dict(zip(data.PARTS, data.check_fractions(fractions)))
    needed = max(int(least / shares[part] * 1.25) + 1 if shares[part] > 0 else 0 for part, least in minimums.items())
    found = " / ".join(f"{len(getattr(parts, p))} {p}" for p in data.PARTS)
    wanted = ", ".join(f"{minimums[p]} {p}" for p in short)
    raise ConfigError(
        f"{source}: {total} distinct texts split into {found} (shares {', '.join(f'{shares[p]:.0%}' for p in data.PARTS)}); "
        f"a build needs at least {wanted} texts: give about {needed} distinct texts or more"
    )


def passage_joiner(tokenizer: Any, tokens: int) -> Callable[[Sequence[str]], list[str]]:
    """Join consecutive texts (in corpus order: neighbouring sentences of one document) into
    passages of at least ``tokens`` tokens with the tokenizer's special tokens (a short last
    passage is dropped), e.g. 512-token inputs for long-attention builds."""
    special = len(tokenizer("", add_special_tokens=True)["input_ids"])

    def join(texts: Sequence[str]) -> list[str]:
        passages, current, count = [], [], special
        for text in texts:
            current.append(text)
            count += len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if count >= tokens:
                passages.append(" ".join(current))
                current, count = [], special
        return passages

    return join


def load_splits(source: str | os.PathLike = STDLIB, column: str | None = None, **options: Any) -> TextSplits:
    """:class:`TextSplits` of the standard-library text or of the user's data at ``source``
    (see :func:`load_texts`); ``options`` go to :meth:`TextSplits.from_texts`."""
    text = os.fspath(source)
    if text == STDLIB:
        if column is not None:
            raise ConfigError(f"the '{STDLIB}' data source has no field or column ('{column}' given)")
        texts = data.corpus("all")
    else:
        texts = load_texts(text, column)
    return TextSplits.from_texts(texts, source=text, description=describe_source(text, column), **options)


# ---- text to pass contexts -----------------------------------------------------------------
def text_context(tokenizer: Any, splits: TextSplits, input_names: Sequence[str] | None = None, *, max_length: int = 128, **fields: Any) -> PassContext:
    """A context whose calibration batches come from the training texts, verification batches
    from the verification texts (batch sizes :data:`VERIFICATION_BATCH_SIZES`, so every
    dynamic axis sees several shapes), and training texts and tokenizer are set; ``fields``
    set the rest. ``input_names`` keeps only the tensors the program takes."""
    calibration = splits.calibration_texts()
    sizes = list(_cycle_sizes(len(splits.verification)))
    verification = _verification_batches(tokenizer, list(splits.verification), sizes, max_length, input_names)
    widths = sorted({int(kwargs[next(iter(kwargs))].shape[1]) for _, kwargs in verification})
    source = splits.description or splits.source
    return PassContext(
        calibration=tuple(_batches(tokenizer, calibration, CALIBRATION_BATCH_SIZE, max_length, input_names)),
        calibration_source=f"{len(calibration)} training texts of {source}",
        training_texts=tuple(splits.train),
        verification=tuple(verification),
        verification_source=f"{len(splits.verification)} verification texts of {source} (batch sizes {sorted(set(sizes))}, widths {widths[0]}..{widths[-1]} tokens)",
        tokenizer=tokenizer,
        **fields,
    )


def _cycle_sizes(count: int) -> Iterator[int]:
    index = 0
    while count > 0:
        size = min(VERIFICATION_BATCH_SIZES[index % len(VERIFICATION_BATCH_SIZES)], count)
        yield size
        count -= size
        index += 1


def _verification_batches(tokenizer: Any, texts: list[str], sizes: list[int], max_length: int, names: Sequence[str] | None) -> list[Batch]:
    batches, start = [], 0
    for size in sizes:
        batches.append(_batch(tokenizer, texts[start : start + size], max_length, names))
        start += size
    widths = {int(kwargs[next(iter(kwargs))].shape[1]) for _, kwargs in batches}
    if len(widths) < 2 and len(batches) > 1 and max(widths) > 2:
        # Every batch hit max_length (long texts): truncate the first shorter so the sequence
        # axis still sees two shapes. Still real text at real positions.
        batches[0] = _batch(tokenizer, texts[: sizes[0]], max(2, max(widths) // 2), names)
    return batches


def _batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int, names: Sequence[str] | None) -> Iterator[Batch]:
    for start in range(0, len(texts), batch_size):
        yield _batch(tokenizer, texts[start : start + batch_size], max_length, names)


def _batch(tokenizer: Any, texts: list[str], max_length: int, names: Sequence[str] | None) -> Batch:
    tensors = data.tokenize(tokenizer, texts, max_length=max_length)
    if names is None:
        return (), tensors
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ConfigError(f"the tokenizer does not produce the model input(s) {missing} (it gives {sorted(tensors)})")
    return (), {name: tensors[name] for name in names}


__all__ = [
    "Batch",
    "TextSplits",
    "describe_source",
    "load_splits",
    "load_texts",
    "program_context",
    "runnable_shapes",
    "text_context",
]
