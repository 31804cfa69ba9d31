"""Ingestion: documents (JSONL records, text or markdown files) into passages of at most `max_words` words.

RAG End2End retrieves 100-word passages; the shared domain data follows that convention (lines packed
greedily, longer lines cut into windows), and so does the chunker here. Passage ids are deterministic from a
passage's position in its document (`<doc_id>-000`, `<doc_id>-001`, ...), so re-ingesting the same document
gives the same ids. JSONL records that already fit in `max_words` are taken as passages as they are (id and
text kept), which is what the shared `passages.jsonl` files are.

A corpus is read completely and validated before anything is written, so a malformed line never leaves a
half-written passages file behind.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from backbone import Passage

from .errors import EmptyCorpus, MalformedPassages
from .files import atomic_file

JSONL_SUFFIXES = (".jsonl",)
TEXT_SUFFIXES = (".txt", ".md", ".markdown")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class ChunkConfig:
    """How documents are cut: at most `max_words` words a passage, `overlap_words` shared by neighbours."""

    max_words: int = 100
    overlap_words: int = 0

    def __post_init__(self) -> None:
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")
        if not 0 <= self.overlap_words < self.max_words:
            raise ValueError(f"overlap_words must be in [0, max_words), got {self.overlap_words}")


@dataclass(frozen=True)
class Document:
    """One source document before chunking; `keep_if_short` marks records that may already be passages."""

    id: str
    title: str
    text: str
    keep_if_short: bool = False
    source: str = ""  # the file of the record, for error messages
    line: int | None = None  # the JSONL line of the record


def chunk_document(document: Document, config: ChunkConfig = ChunkConfig()) -> list[Passage]:
    """Split one document into passages of at most `config.max_words` words, line breaks kept.

    Whole lines are packed greedily; a passage ends at a line end when that fills at least half of it,
    otherwise inside the next line (so a heading before a long paragraph does not become a passage of its
    own), and a line longer than the limit is cut into windows. With an overlap, each passage after the first
    starts with the last `overlap_words` words of the one before.
    """
    lines = [line.split() for line in document.text.splitlines()]
    words: list[str] = []
    line_starts: set[int] = set()  # word positions that begin a line (a preferred place to cut)
    for line in lines:
        if line:
            line_starts.add(len(words))
            words += line
    if not words:
        return []
    if document.keep_if_short and len(words) <= config.max_words:
        return [Passage(document.id, document.title, document.text)]
    boundaries = sorted(line_starts | {len(words)})
    passages, start = [], 0
    while True:
        limit = start + config.max_words
        last_fitting = boundaries[bisect.bisect_right(boundaries, limit) - 1]
        # Cut at a line end if that fills half a passage or more; else cut inside the long line that follows.
        end = last_fitting if last_fitting - start >= config.max_words // 2 else min(limit, len(words))
        text = _join(words, start, end, line_starts)
        passages.append(Passage(f"{document.id}-{len(passages):03d}", document.title, text))
        if end >= len(words):
            return passages
        start = max(end - config.overlap_words, start + 1)


def _join(words: list[str], start: int, end: int, line_starts: set[int]) -> str:
    parts = []
    for i in range(start, end):
        if i > start:
            parts.append("\n" if i in line_starts else " ")
        parts.append(words[i])
    return "".join(parts)


def read_documents(path: Path) -> list[Document]:
    """Documents from a `.jsonl`, `.txt` or `.md` file, or a directory of them (recursively, sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + TEXT_SUFFIXES
        )
        documents = []
        for file in files:
            documents += _read_file(file, doc_id=file.relative_to(path).with_suffix("").as_posix())
        return documents
    if not path.is_file():
        raise MalformedPassages("no such file or directory", path=str(path))
    return _read_file(path, doc_id=path.stem)


def _read_file(path: Path, doc_id: str) -> list[Document]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return list(_read_jsonl(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedPassages(f"not UTF-8 text ({exc.reason})", path=str(path)) from None
    title, body = path.stem, text
    if path.suffix.lower() in (".md", ".markdown"):
        title, body = _markdown_title(text, default=path.stem)
    return [Document(doc_id, title, body, keep_if_short=False, source=str(path))]


def _markdown_title(text: str, default: str) -> tuple[str, str]:
    """The first heading is the title; heading markers leave the text so they do not count as words."""
    title = None
    lines = []
    for line in text.splitlines():
        match = _HEADING.match(line)
        if match:
            title = title or match.group(2)
            line = match.group(2)
        lines.append(line)
    return title or default, "\n".join(lines)


def _read_jsonl(path: Path) -> Iterable[Document]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedPassages(f"not UTF-8 ({exc.reason})", path=str(path), line=number) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MalformedPassages(f"invalid JSON ({exc.msg})", path=str(path), line=number) from None
            if not isinstance(record, dict):
                raise MalformedPassages("expected a JSON object", path=str(path), line=number)
            doc_id, title, text = record.get("id"), record.get("title", ""), record.get("text")
            if isinstance(doc_id, int) and not isinstance(doc_id, bool):
                doc_id = str(doc_id)
            if not isinstance(doc_id, str) or not doc_id.strip():
                raise MalformedPassages('"id" must be a non-empty string', path=str(path), line=number)
            if not isinstance(text, str):
                raise MalformedPassages('"text" must be a string', path=str(path), line=number)
            if title is None:
                title = ""
            if not isinstance(title, str):
                raise MalformedPassages('"title" must be a string', path=str(path), line=number)
            yield Document(doc_id, title, text, keep_if_short=True, source=str(path), line=number)


def load_corpus(path: Path, config: ChunkConfig = ChunkConfig()) -> list[Passage]:
    """Read and chunk a corpus; MalformedPassages (with the line) or EmptyCorpus before anything is kept."""
    passages: list[Passage] = []
    seen: dict[str, Document] = {}
    for document in read_documents(path):
        for passage in chunk_document(document, config):
            first = seen.get(passage.id)
            if first is not None:
                where = f"line {first.line}" if first.line is not None else "a passage"
                if first.source != document.source:
                    where += f" of {first.source}"
                raise MalformedPassages(
                    f"duplicate passage id {passage.id!r} (first on {where})",
                    path=document.source or None,
                    line=document.line,
                )
            seen[passage.id] = document
            passages.append(passage)
    if not passages:
        raise EmptyCorpus(f"{path} holds no passage text")
    return passages


def _passage_line(passage: Passage) -> bytes:
    return (
        json.dumps({"id": passage.id, "title": passage.title, "text": passage.text}, ensure_ascii=False)
        + "\n"
    ).encode("utf-8")


def passages_checksum(passages: Iterable[Passage]) -> str:
    """sha256 of the canonical passages JSONL: a corpus's identity, recorded with every index built on it."""
    digest = hashlib.sha256()
    for passage in passages:
        digest.update(_passage_line(passage))
    return digest.hexdigest()


def write_passages(passages: list[Passage], path: Path) -> str:
    """Write the canonical passages JSONL atomically (temp file + rename) and return its checksum."""
    digest = hashlib.sha256()
    with atomic_file(Path(path)) as fh:
        for passage in passages:
            line = _passage_line(passage)
            digest.update(line)
            fh.write(line)
    return digest.hexdigest()


def read_passages(path: Path) -> list[Passage]:
    """Read a canonical passages JSONL (as written by `write_passages`) without re-chunking."""
    passages = []
    for document in _read_jsonl(Path(path)):
        passages.append(Passage(document.id, document.title, document.text))
    return passages
