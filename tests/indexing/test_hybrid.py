"""Hybrid retrieval on a corpus where BM25 and the dense retriever disagree; expectations computed by hand."""

import numpy as np
import pytest

from backbone import Passage
from indexing.builder import IndexConfig, write_index
from indexing.errors import RetrievalModeUnavailable
from indexing.fusion import min_max, reciprocal_rank_fusion, weighted_fusion
from indexing.searcher import IndexHandle

TEXTS = [
    "paris capital france",
    "rome capital italy",
    "seine river paris bridges",
    "tiber river rome",
    "coffee house friends",
    "revenue million dollars",
]
# Passage i's embedding is the unit vector e_i, so the dense score of passage i is QUERY[i].
QUERY = np.array([[0.8, 0.2, 0.0, 0.1, 0.9, 0.3]], dtype=np.float32)
QUERY_TEXT = ["river paris"]
DENSE_ORDER = [4, 0, 5, 1, 3, 2]
BM25_ORDER = [2, 0, 3]  # only passages sharing a word; 0 and 3 tie (same length, same idf), lower index first


def open_hybrid(tmp_path, **config) -> IndexHandle:
    passages = [Passage(f"p{i}", "", text) for i, text in enumerate(TEXTS)]
    directory = tmp_path / "v1"
    write_index(
        directory,
        passages,
        np.eye(6, dtype=np.float32),
        build_id="v1",
        encoder_fingerprint="hand-made",
        config=IndexConfig(**config),
    )
    return IndexHandle.open(directory, domain="geo", embedding_dim=6)


def order(row) -> list[int]:
    return [int(hit.passage.id[1:]) for hit in row]


def test_dense_and_bm25_disagree_on_this_corpus(tmp_path):
    handle = open_hybrid(tmp_path)
    assert order(handle.search(QUERY, QUERY_TEXT, k=6, mode="dense")[0]) == DENSE_ORDER
    assert order(handle.search(None, QUERY_TEXT, k=6, mode="bm25")[0]) == BM25_ORDER


def test_rrf_prefers_the_passage_both_retrievers_rank_well(tmp_path):
    handle = open_hybrid(tmp_path, fusion="rrf", rrf_k=60)
    [row] = handle.search(QUERY, QUERY_TEXT, k=6, mode="hybrid")
    # p0: 1/62 + 1/62; p2: 1/66 + 1/61; p3: 1/65 + 1/63; p4: 1/61; p5: 1/63; p1: 1/64
    assert order(row) == [0, 2, 3, 4, 5, 1]
    assert row[0].score == pytest.approx(2 / 62)
    assert row[3].score == pytest.approx(1 / 61)


@pytest.mark.parametrize(
    "dense_weight, expected",
    [
        (1.0, DENSE_ORDER),
        (0.6, [4, 0, 2, 5, 1, 3]),  # dense normalised: q / 0.9; bm25 normalised: p2 = 1, p0 = p3 = 0
        (0.3, [2, 4, 0, 5, 1, 3]),
    ],
)
def test_weighted_fusion_follows_the_weight(tmp_path, dense_weight, expected):
    handle = open_hybrid(tmp_path, fusion="weighted", dense_weight=dense_weight)
    [row] = handle.search(QUERY, QUERY_TEXT, k=6, mode="hybrid")
    assert order(row) == expected


def test_domain_default_mode_and_per_request_override(tmp_path):
    handle = open_hybrid(tmp_path, retrieval="hybrid", fusion="rrf", dense_weight=0.6)
    assert order(handle.search(QUERY, QUERY_TEXT, k=2)[0]) == [0, 2]
    assert order(handle.search(QUERY, QUERY_TEXT, k=2, mode="dense")[0]) == [4, 0]
    assert order(handle.search(QUERY, QUERY_TEXT, k=2, fusion="weighted")[0]) == [4, 0]


def test_bm25_returns_nothing_for_a_query_without_known_words(tmp_path):
    handle = open_hybrid(tmp_path)
    assert handle.search(None, ["zebra quantum"], k=3, mode="bm25") == [[]]
    assert order(handle.search(QUERY, ["zebra quantum"], k=3, mode="hybrid")[0]) == [4, 0, 5]


def test_index_without_bm25_refuses_lexical_modes(tmp_path):
    handle = open_hybrid(tmp_path, bm25=False)
    assert handle.modes == ("dense",)
    with pytest.raises(RetrievalModeUnavailable) as caught:
        handle.search(QUERY, QUERY_TEXT, k=3, mode="hybrid")
    assert caught.value.status == 422


def test_fusion_functions_by_hand():
    assert reciprocal_rank_fusion([[7, 3], [3, 9]], k=1) == [(3, 1 / 3 + 1 / 2), (7, 1 / 2), (9, 1 / 3)]
    fused = weighted_fusion(([1, 2, 3], [3.0, 2.0, 1.0]), ([3, 4], [10.0, 0.0]), dense_weight=0.25)
    assert fused == [(3, pytest.approx(0.75)), (1, pytest.approx(0.25)), (2, pytest.approx(0.125)), (4, 0.0)]
    np.testing.assert_allclose(min_max(np.array([2.0, 2.0])), [1.0, 1.0])
