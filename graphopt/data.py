"""English sentences for calibration, distillation, verification and held-out evaluation.

Everything comes from the Python standard library, so it is offline and deterministic:
the reference text of ``pydoc_data.topics`` (the language reference as plain text) and,
for more volume, the docstrings of a fixed list of standard-library modules.

A text's part of the three-way split (training / verification / held-out) is decided by
the SHA-256 of its :func:`normalise`-d form alone (case, punctuation and whitespace folded),
not ``hash()``: it is the same in every process, on every machine and whatever list the
text arrived in, and two texts that differ only in case or punctuation always land in
the same part. So nothing a model was calibrated or distilled on, and nothing the
verification budget was spent on, can leak into the texts its fidelity is quoted on.
:mod:`graphopt.datasets` splits a user's own data the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from graphopt.errors import ConfigError

SOURCES = ("topics", "stdlib", "all")
PADDING_MODES = ("longest", "max_length")
MIN_WORDS = 6
MAX_WORDS = 60

# Modules whose docstrings are read for source="stdlib". Fixed and sorted so the corpus does
# not depend on what else is installed. Left out on purpose: GUI modules (tkinter, turtle,
# idlelib), modules with import side effects (antigravity, this, readline, rlcompleter),
# distutils (setuptools may shadow it) and modules deprecated for removal in 3.13.
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bdb", "binascii", "bisect",
    "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs", "codeop", "collections",
    "collections.abc", "colorsys", "compileall", "concurrent.futures", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime",
    "dbm", "decimal", "difflib", "dis", "doctest", "email", "email.message", "email.utils",
    "enum", "errno", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "gc",
    "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html", "html.parser", "http", "http.client", "http.cookiejar", "http.cookies",
    "http.server", "imaplib", "importlib", "importlib.metadata", "importlib.resources",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale",
    "logging", "logging.config", "logging.handlers", "lzma", "mailbox", "marshal", "math",
    "mimetypes", "mmap", "modulefinder", "multiprocessing", "netrc", "numbers", "operator",
    "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "py_compile", "pyclbr",
    "pydoc", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets",
    "select", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep", "struct",
    "subprocess", "symtable", "sys", "sysconfig", "tabnanny", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "trace", "traceback",
    "tracemalloc", "types", "typing", "unicodedata", "unittest", "unittest.mock",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid",
    "warnings", "wave", "weakref", "wsgiref", "xml.dom", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib",
    "zoneinfo",
)  # fmt: skip


PARTS = ("train", "verification", "heldout")
# Held-out takes the lowest keys, verification the next: a part keeps its texts when a later
# part's share changes, and held-out ones never move when the verification share does.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train, verification, held-out


class Split(NamedTuple):
    train: list[str]
    verification: list[str]
    heldout: list[str]


# ---- corpus ------------------------------------------------------------------------------
def corpus(source: str = "all") -> list[str]:
    """Distinct English sentences in a stable order (a fresh list; callers may mutate it).

    ``"topics"``: the ``pydoc_data.topics`` reference text; ``"stdlib"``: docstrings of
    :data:`STDLIB_MODULES`; ``"all"``: both, topics first, de-duplicated.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown corpus source {source!r}; choose one of {', '.join(SOURCES)}")
    return list(_corpus(source))


@functools.cache
def _corpus(source: str) -> tuple[str, ...]:
    if source == "topics":
        return _topics_sentences()
    if source == "stdlib":
        return _stdlib_sentences()
    return tuple(dict.fromkeys(_corpus("topics") + _corpus("stdlib")))


def _topics_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    texts = (topics[key] for key in sorted(topics))
    return tuple(dict.fromkeys(s for text in texts for s in sentences_from_text(text)))


def _stdlib_sentences() -> tuple[str, ...]:
    found: dict[str, None] = {}
    for name in STDLIB_MODULES:
        module = _import_quietly(name)
        if module is None:
            continue
        for doc in _docstrings(module):
            found.update(dict.fromkeys(sentences_from_text(doc)))
    return tuple(found)


def _import_quietly(name: str) -> Any:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a platform without the module, or one that fails to import
            return None


def _docstrings(module: Any) -> Iterator[str]:
    """The module's docstring, then those of its public functions, classes and methods."""
    yield module.__doc__ or ""
    prefix = module.__name__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not _defined_in(obj, prefix):
            continue
        yield obj.__doc__ or ""
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and (callable(member) or isinstance(member, (property, classmethod))):
                    yield getattr(member, "__doc__", None) or ""


def _defined_in(obj: Any, prefix: str) -> bool:
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        return False
    owner = getattr(obj, "__module__", None) or ""
    return owner == prefix or owner.startswith(prefix + ".")


# ---- text to sentences -------------------------------------------------------------------
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*[+|]?[=\-+| ]{3,}[+|]?\s*$")
_BULLET = re.compile(r"^\s*(?:[*\-+\u2022]|\d+\.|\(\d+\)|[a-z]\))\s+")
_FIELD = re.compile(r"^\s*:\w[^:]*:")  # reST field lists (":param x:", ":returns:")
_SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Examples?|Keyword Args|Notes?|Parameters|Raises|Returns|Yields)\s*:?\s*$")
_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``|`([^`]*)`")
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_EMPHASIS = re.compile(r"(?<![\w*\"'])\*{1,2}(?=\w)([^*]+?)(?<=[\w).])\*{1,2}(?![\w*])")
# A sentence ends at . ! or ? before a capital, a quote or a parenthesis, but not after "e.g.".
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<=[.!?])\s+(?=[A-Z\"'(])")
# Markers that only code or markup carries; rarer symbols ([, *, <) are limited by _PROSE_CHARS.
_CODE_MARKERS = (">>>", "::", "==", "!=", "->", "+=", "{", "}", "\\", "|", "`", "://", "...", "$")
_PROSE_CHARS = re.compile(r"[\w .,;:'\"()\u2019\u201c\u201d?!-]")
_WORD_PUNCTUATION = ".,;:()'\"\u2019\u201c\u201d?!"


def sentences_from_text(text: str) -> list[str]:
    """Prose sentences of a plain-text or reST document, in order, duplicates kept."""
    sentences: list[str] = []
    for paragraph in _paragraphs(text):
        paragraph = _LITERAL.sub(lambda m: m.group(1) or m.group(2) or "", _ROLE.sub(r"\1", paragraph))
        paragraph = _EMPHASIS.sub(r"\1", _FOOTNOTE.sub("", paragraph))
        sentences.extend(s for s in _SENTENCE_END.split(paragraph) if is_prose_sentence(s))
    return sentences


def _paragraphs(text: str) -> Iterator[str]:
    lines = inspect.cleandoc(text).splitlines()
    current: list[str] = []
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if _UNDERLINE.match(following) and line.strip():
            continue  # a heading; its underline is dropped next
        if not line.strip() or _UNDERLINE.match(line) or _TABLE_RULE.match(line) or _FIELD.match(line) or _SECTION.match(line):
            yield from _flush(current)
            continue
        bullet = _BULLET.match(line)
        if bullet:
            yield from _flush(current)
            line = line[bullet.end() :]
        current.append(line.strip())
    yield from _flush(current)


def _flush(lines: list[str]) -> Iterator[str]:
    if lines:
        yield " ".join(" ".join(lines).split())
        lines.clear()


def is_prose_sentence(sentence: str) -> bool:
    """A sentence of English prose of reasonable length, not code or markup.

    One ending in a colon is kept: in reference text it introduces an example, but it is
    still a complete English sentence.
    """
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not (sentence[0].isupper() or sentence[0] in "\"(") or sentence[-1] not in ".?!:":
        return False
    if any(marker in sentence for marker in _CODE_MARKERS):
        return False
    plain_words = sum(1 for w in words if w.strip(_WORD_PUNCTUATION).isalpha() and w.islower())
    if plain_words < len(words) / 2:
        return False
    return len(_PROSE_CHARS.findall(sentence)) >= 0.97 * len(sentence)


# ---- the three-way split ----------------------------------------------------------------
_PUNCTUATION_OR_SYMBOL = ("P", "S")


def normalise(text: str) -> str:
    """``text`` with case, punctuation and whitespace folded: the form the split hashes.

    Unicode compatibility forms are unified (NFKC), letters case-folded, every punctuation
    or symbol character becomes a space and runs of whitespace one space, so "Return the
    value." and "return  the value!" are one text to the split."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(" " if unicodedata.category(c)[0] in _PUNCTUATION_OR_SYMBOL else c for c in folded)
    return " ".join(spaced.split())


def heldout_key(sentence: str, seed: int | str = 0) -> float:
    """A number in [0, 1) fixed by the string and the seed alone (SHA-256 of exactly ``sentence``)."""
    digest = hashlib.sha256(f"{seed}\x00{sentence}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_key(text: str, seed: int | str = 0) -> float:
    """The split's key of ``text``: :func:`heldout_key` of its :func:`normalise`-d form."""
    return heldout_key(normalise(text), seed)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(not 0.0 <= f <= 1.0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must be three shares (train, verification, held-out) in [0, 1] summing to 1, got {list(fractions)}")
    return values


def part_of(text: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> str:
    """Which of :data:`PARTS` ``text`` belongs to."""
    _, verification, heldout = check_fractions(fractions)
    key = split_key(text, seed)
    if key < heldout:
        return "heldout"
    return "verification" if key < heldout + verification else "train"


def is_heldout(sentence: str, heldout_fraction: float = DEFAULT_FRACTIONS[2], seed: int = 0) -> bool:
    return split_key(sentence, seed) < heldout_fraction


def split(sentences: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Split:
    """Training, verification and held-out texts, each in input order; a text's part
    depends on its normalised form alone (duplicates are kept, on one side)."""
    fractions = check_fractions(fractions)
    result = Split([], [], [])
    for sentence in sentences:
        getattr(result, part_of(sentence, fractions, seed)).append(sentence)
    return result


def halves(sentences: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Two disjoint halves of ``sentences`` (the first gets the odd one), each in input order,
    chosen by hash under their own salt: independent of the list's order and of the split.
    Recipe search chooses on the first and quotes the second."""
    distinct = list(dict.fromkeys(sentences))
    ranked = sorted(distinct, key=lambda s: (split_key(s, seed=f"halves-{seed}"), s))
    first = set(ranked[: (len(ranked) + 1) // 2])
    return [s for s in distinct if s in first], [s for s in distinct if s not in first]


@functools.lru_cache(maxsize=8)
def _corpus_split(source: str, fractions: tuple[float, float, float], seed: int) -> Split:
    return split(_corpus(source), fractions, seed)


def _part(part: str, n: int | None, source: str, fractions: Sequence[float], seed: int) -> list[str]:
    if source not in SOURCES:
        corpus(source)  # raises the ConfigError naming the sources
    sentences = getattr(_corpus_split(source, check_fractions(fractions), seed), part)
    return _sample(list(sentences), n, seed)


def heldout_sentences(n: int | None = None, *, source: str = "all", fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """Held-out sentences (never trained, calibrated or verified on): what reports and gates
    quote; ``n`` of them if given."""
    return _part("heldout", n, source, fractions, seed)


def verification_sentences(n: int | None = None, *, source: str = "all", fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """Sentences the verification budget is measured on, disjoint from the other two parts."""
    return _part("verification", n, source, fractions, seed)


def train_sentences(n: int | None = None, *, source: str = "all", fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """Sentences for calibration and distillation, disjoint from the other two parts."""
    return _part("train", n, source, fractions, seed)


def sample(sentences: Sequence[str], n: int | None, seed: int = 0) -> list[str]:
    """``n`` of ``sentences`` (all when ``n`` is None or larger), chosen by hash, in input order."""
    return _sample(list(sentences), n, seed)


def _sample(sentences: list[str], n: int | None, seed: int) -> list[str]:
    # The n with the smallest hash under another salt, kept in corpus order: spread over the
    # whole corpus rather than its first topics, and stable when the corpus grows elsewhere.
    if n is None or n >= len(sentences):
        return sentences
    if n < 0:
        raise ConfigError(f"n must be non-negative, got {n}")
    chosen = set(sorted(sentences, key=lambda s: heldout_key(s, seed=f"sample-{seed}"))[:n])
    return [s for s in sentences if s in chosen]


# ---- tokenization ------------------------------------------------------------------------
def tokenize(tokenizer: Any, sentences: Sequence[str], max_length: int = 128, padding: str = "longest") -> dict[str, torch.Tensor]:
    """Token tensors for ``sentences``: truncated to ``max_length``, padded to the longest row
    (``"longest"``) or to ``max_length``; works for tokenizers without a pad token too."""
    if padding not in PADDING_MODES:
        raise ConfigError(f"unknown padding {padding!r}; choose one of {', '.join(PADDING_MODES)}")
    if isinstance(sentences, str):
        sentences = [sentences]
    encoded = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)
    rows = [{key: list(values[i]) for key, values in encoded.items()} for i in range(len(sentences))]
    return pad_rows(tokenizer, rows, max_length if padding == "max_length" else None)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(ids, mask)`` ``[batch, longest]``, padded on the left (a decoder's padding
    side, as ``generate`` pads)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of every slot of a left-padded ``attention_mask``: real tokens count from 0,
    padding gets 1 (what ``generate`` feeds a decoder)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def pad_rows(tokenizer: Any, rows: Sequence[dict[str, list[int]]], length: int | None = None) -> dict[str, torch.Tensor]:
    """Stack per-sentence token lists into tensors, padding on the tokenizer's padding side."""
    if not rows:
        raise ConfigError("no sentences to tokenize")
    length = max(len(row["input_ids"]) for row in rows) if length is None else length
    pad_id = _pad_token_id(tokenizer)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        padded = []
        for row in rows:
            values = row[key][:length]
            pad = [fill] * (length - len(values))
            padded.append(pad + values if left else values + pad)
        batch[key] = torch.tensor(padded, dtype=torch.long)
    return batch


def _pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value  # any id works under a zero attention mask
    return 0


def batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128, padding: str = "longest"
) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`tokenize` over consecutive chunks of ``batch_size`` sentences, in order."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(sentences), batch_size):
        yield tokenize(tokenizer, sentences[start : start + batch_size], max_length=max_length, padding=padding)
