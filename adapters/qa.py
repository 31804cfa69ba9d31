"""Question-answer sets of a domain: what adaptation runs train on and evaluate against.

Store layout (beside the domain's passages, indexes and adapters; written by `POST /admin/domains` with a
`qa` file and by `QaSets.publish`):

    domains/<domain>/qa/<version>/qa.jsonl        one example a line
    domains/<domain>/qa/<version>/manifest.json   written last (storage.artifacts): count, splits, source

A line is one example, `split` defaulting to "train" and `passage_ids` naming the gold passages (retrieval
recall is measured against them):

    {"question": str, "answers": [str, ...], "passage_ids"?: [str, ...], "split"?: str, "id"?: str}

The newest complete version is the domain's QA set; older versions stay readable, so a run pins the version it
was submitted against.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import InvalidQaSet
from storage import artifacts
from storage.artifacts import Manifest
from storage.errors import IntegrityError, VersionNotFound
from storage.registry import DomainRegistry
from storage.store import ObjectStore

QA_FILE = "qa.jsonl"
DEFAULT_SPLIT = "train"


@dataclass(frozen=True)
class QaExample:
    question: str
    answers: tuple[str, ...]
    passage_ids: tuple[str, ...] = ()
    split: str = DEFAULT_SPLIT
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "question": self.question,
            "answers": list(self.answers),
            "passage_ids": list(self.passage_ids),
            "split": self.split,
        }
        if self.id:
            row["id"] = self.id
        return row


@dataclass(frozen=True)
class QaSet:
    version: str
    examples: list[QaExample] = field(default_factory=list)

    def split(self, name: str) -> list[QaExample]:
        return [e for e in self.examples if e.split == name]


def example_from_record(record: Any, *, line: int | None = None) -> QaExample:
    """Validate one decoded record; raises InvalidQaSet naming the line and the field at fault."""
    if not isinstance(record, dict):
        raise InvalidQaSet("expected a JSON object", line=line)
    question, answers = record.get("question"), record.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise InvalidQaSet('"question" must be a non-empty string', line=line)
    if isinstance(answers, str):
        answers = [answers]
    if (
        not isinstance(answers, list)
        or not answers
        or not all(isinstance(a, str) and a.strip() for a in answers)
    ):
        raise InvalidQaSet('"answers" must be a non-empty list of non-empty strings', line=line)
    passage_ids = record.get("passage_ids") or []
    if not isinstance(passage_ids, list) or not all(isinstance(p, str) and p for p in passage_ids):
        raise InvalidQaSet('"passage_ids" must be a list of passage id strings', line=line)
    split = record.get("split") or DEFAULT_SPLIT
    if not isinstance(split, str):
        raise InvalidQaSet('"split" must be a string', line=line)
    example_id = record.get("id", "")
    return QaExample(
        question.strip(),
        tuple(a.strip() for a in answers),
        tuple(passage_ids),
        split,
        str(example_id) if example_id is not None else "",
    )


def parse_qa_jsonl(data: bytes) -> list[QaExample]:
    """Every example of a QA JSONL file (blank lines skipped); InvalidQaSet with the line number otherwise."""
    examples = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidQaSet(f"not UTF-8 ({exc.reason})", line=number) from None
        except json.JSONDecodeError as exc:
            raise InvalidQaSet(f"invalid JSON ({exc.msg})", line=number) from None
        examples.append(example_from_record(record, line=number))
    return examples


def to_jsonl(examples: Iterable[QaExample]) -> bytes:
    return "".join(json.dumps(e.to_dict(), ensure_ascii=False) + "\n" for e in examples).encode("utf-8")


class QaSets:
    """Versions of each domain's QA set on the artifact store."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._domains = DomainRegistry(store)

    def prefix(self, domain: str) -> str:
        return f"domains/{domain}/qa"

    def publish(self, domain: str, examples: list[QaExample], *, source: str | None = None) -> Manifest:
        """Store `examples` as the domain's newest QA version."""
        self._require_domain(domain)
        if not examples:
            raise InvalidQaSet("a QA set needs at least one example")
        splits = Counter(e.split for e in examples)
        metadata = {"count": len(examples), "splits": dict(sorted(splits.items())), "source": source}
        with tempfile.TemporaryDirectory(prefix="ragadapt-qa-") as scratch:
            path = Path(scratch) / QA_FILE
            path.write_bytes(to_jsonl(examples))
            return artifacts.publish(self._store, self.prefix(domain), {QA_FILE: path}, metadata)

    def latest(self, domain: str) -> Manifest | None:
        """The manifest of the newest complete QA version, or None when the domain has none."""
        self._require_domain(domain)
        versions = artifacts.list_versions(self._store, self.prefix(domain))
        return versions[-1] if versions else None

    def load(self, domain: str, version: str) -> QaSet:
        """Read one QA version (its single file is small enough to hold in memory)."""
        try:
            manifest = artifacts.read_manifest(self._store, self.prefix(domain), version)
        except VersionNotFound as exc:
            raise InvalidQaSet(f"domain {domain!r} has no QA version {version!r}") from exc
        key = f"{self.prefix(domain)}/{version}/{QA_FILE}"
        data = self._store.get_bytes(key)
        entry = manifest.files.get(QA_FILE)
        if entry is None or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"{key} does not match the checksum in its manifest")
        return QaSet(version, parse_qa_jsonl(data))

    def _require_domain(self, domain: str) -> None:
        self._domains.get_domain(domain)  # storage's DomainNotFound when there is none
