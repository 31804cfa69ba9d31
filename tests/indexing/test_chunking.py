import json

import pytest

from indexing.chunking import (
    ChunkConfig,
    Document,
    chunk_document,
    load_corpus,
    read_passages,
    write_passages,
)
from indexing.errors import EmptyCorpus, MalformedPassages


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_long_document_becomes_passages_of_at_most_100_words_covering_all_words():
    text = "\n".join(words(37, f"l{line}x") for line in range(9))  # 333 words in 9 lines
    passages = chunk_document(Document("doc", "Title", text))
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert [w for p in passages for w in p.text.split()] == text.split()
    assert [p.id for p in passages] == ["doc-000", "doc-001", "doc-002", "doc-003", "doc-004"]
    assert [len(p.text.split()) for p in passages] == [74, 74, 74, 74, 37]  # two whole 37-word lines each
    assert {p.title for p in passages} == {"Title"}
    # Whole lines are packed: no line is cut when it fits.
    assert all(line in text.splitlines() for p in passages for line in p.text.splitlines())


def test_a_line_longer_than_the_limit_is_cut_into_windows():
    passages = chunk_document(Document("doc", "", words(250)), ChunkConfig(max_words=100))
    assert [len(p.text.split()) for p in passages] == [100, 100, 50]


def test_a_heading_before_a_long_paragraph_does_not_become_a_passage_of_its_own():
    passages = chunk_document(Document("doc", "", "Heading\n" + words(150)))
    assert [len(p.text.split()) for p in passages] == [100, 51]
    assert passages[0].text.startswith("Heading\nw0 w1")


def test_overlap_repeats_the_tail_of_the_previous_passage():
    passages = chunk_document(Document("doc", "", words(250)), ChunkConfig(max_words=100, overlap_words=20))
    first, second = passages[0].text.split(), passages[1].text.split()
    assert second[:20] == first[-20:]
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert passages[-1].text.split()[-1] == "w249"


def test_ids_are_stable_across_runs_and_independent_of_other_documents(tmp_path):
    source = tmp_path / "docs.jsonl"
    records = [{"id": "a", "title": "A", "text": words(150)}, {"id": "b", "title": "B", "text": words(30)}]
    source.write_text("\n".join(json.dumps(r) for r in records))
    first = load_corpus(source)
    source.write_text("\n".join(json.dumps(r) for r in [records[1], records[0]]))
    second = load_corpus(source)
    assert sorted(first, key=lambda p: p.id) == sorted(second, key=lambda p: p.id)
    assert [p.id for p in first] == ["a-000", "a-001", "b"]


def test_passages_jsonl_loads_as_is(tmp_path):
    source = tmp_path / "passages.jsonl"
    records = [
        {"id": "p1", "title": "T", "text": "line one\nline  two"},
        {"id": "p2", "title": "U", "text": "x"},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    passages = load_corpus(source)
    assert [(p.id, p.title, p.text) for p in passages] == [(r["id"], r["title"], r["text"]) for r in records]


def test_markdown_title_is_the_first_heading_and_text_files_use_the_file_name(tmp_path):
    (tmp_path / "guide.md").write_text("Intro words\n\n# Setting up\n\nInstall the thing.\n## Next\nMore.")
    (tmp_path / "notes.txt").write_text("plain notes here")
    passages = load_corpus(tmp_path)
    by_id = {p.id: p for p in passages}
    assert by_id["guide-000"].title == "Setting up"
    assert "#" not in by_id["guide-000"].text
    assert by_id["notes-000"].title == "notes"
    assert by_id["notes-000"].text == "plain notes here"


def test_malformed_jsonl_reports_the_line_and_writes_nothing(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(
        '{"id": "a", "text": "fine"}\n\n{"id": "b", "text": "broken"\n{"id": "c", "text": "x"}\n'
    )
    target = tmp_path / "out" / "passages.jsonl"
    with pytest.raises(MalformedPassages) as caught:
        write_passages(load_corpus(source), target)
    assert caught.value.line == 3
    assert caught.value.code == "malformed_passages" and caught.value.status == 422
    assert "bad.jsonl:3" in str(caught.value)
    assert not target.exists()


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"title": "no id", "text": "x"}', '"id"'),
        ('{"id": "a", "text": 5}', '"text"'),
        ('["not", "an", "object"]', "JSON object"),
    ],
)
def test_records_without_id_or_text_are_malformed(tmp_path, line, reason):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n")
    with pytest.raises(MalformedPassages, match=reason) as caught:
        load_corpus(source)
    assert caught.value.line == 2


def test_duplicate_passage_ids_are_malformed(tmp_path):
    source = tmp_path / "dup.jsonl"
    source.write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n')
    with pytest.raises(MalformedPassages, match="duplicate passage id 'a'"):
        load_corpus(source)


def test_empty_corpus_is_a_typed_error(tmp_path):
    source = tmp_path / "empty.jsonl"
    source.write_text('\n{"id": "a", "title": "t", "text": "   "}\n')
    with pytest.raises(EmptyCorpus) as caught:
        load_corpus(source)
    assert caught.value.status == 422


def test_written_passages_read_back_identically(tmp_path, corpus):
    checksum = write_passages(corpus, tmp_path / "p.jsonl")
    assert read_passages(tmp_path / "p.jsonl") == corpus
    assert checksum == write_passages(list(corpus), tmp_path / "q.jsonl")
