"""Dense search against exact brute force (FAISS's habit), index persistence, handles, the live holder."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from backbone import Passage
from indexing.builder import IndexConfig, write_index
from indexing.errors import DimensionMismatch, InvalidIndexConfig
from indexing.searcher import IndexHandle


def random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_passages(n: int) -> list[Passage]:
    return [Passage(f"p{i}", f"title {i}", f"text of passage {i}") for i in range(n)]


def open_random(tmp_path, n, dim, config=IndexConfig(), name="v1", seed=0, domain="news"):
    embeddings = random_unit(n, dim, seed)
    write_index(
        tmp_path / name,
        synthetic_passages(n),
        embeddings,
        build_id=name,
        encoder_fingerprint="random",
        config=config,
    )
    return IndexHandle.open(tmp_path / name, domain=domain, embedding_dim=dim), embeddings


def test_flat_search_equals_exact_brute_force(tmp_path):
    handle, embeddings = open_random(tmp_path, 3000, 48)
    queries = random_unit(40, 48, seed=1)
    hits = handle.search(queries, k=10, mode="dense")
    exact = queries @ embeddings.T  # [40, 3000]
    expected = np.argsort(-exact, axis=1)[:, :10]
    assert handle.info.factory == "Flat"
    assert [[int(h.passage.id[1:]) for h in row] for row in hits] == expected.tolist()
    np.testing.assert_allclose(
        [[h.score for h in row] for row in hits],
        np.take_along_axis(exact, expected, axis=1),
        rtol=1e-5,
        atol=1e-5,
    )


def test_hits_carry_passage_ids_titles_and_texts_and_accept_torch_queries(tmp_path):
    handle, embeddings = open_random(tmp_path, 50, 16)
    [row] = handle.search(torch.from_numpy(embeddings[7:8]).to(torch.bfloat16), k=3, mode="dense")
    assert row[0].passage == Passage("p7", "title 7", "text of passage 7")
    assert row[0].score == pytest.approx(1.0, abs=1e-2)
    assert len(row) == 3 and row[0].score >= row[1].score >= row[2].score


def test_k_larger_than_the_corpus_returns_every_passage_once(tmp_path):
    handle, _ = open_random(tmp_path, 5, 8)
    [row] = handle.search(random_unit(1, 8, 3), k=50, mode="dense")
    assert sorted(h.passage.id for h in row) == [f"p{i}" for i in range(5)]


def test_hnsw_recall_at_10_is_at_least_95_percent_of_flat(tmp_path):
    config = IndexConfig(flat_max=10_000, hnsw_ef_construction=40, bm25=False)  # "auto": HNSW32 here
    handle, embeddings = open_random(tmp_path, 20_000, 32, config=config)
    assert handle.info.factory == "HNSW32"
    queries = random_unit(200, 32, seed=2)
    exact = np.argsort(-(queries @ embeddings.T), axis=1)[:, :10]  # [200, 10]
    found = [[int(h.passage.id[1:]) for h in row] for row in handle.search(queries, k=10, mode="dense")]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact.tolist())])
    assert recall >= 0.95


def test_ivf_factory_string_is_honoured_and_exact_when_probing_every_list(tmp_path):
    handle, embeddings = open_random(
        tmp_path, 2000, 16, config=IndexConfig(factory="IVF16,Flat", ivf_nprobe=16)
    )
    queries = random_unit(20, 16, seed=4)
    found = [[int(h.passage.id[1:]) for h in row] for row in handle.search(queries, k=5, mode="dense")]
    assert handle.info.factory == "IVF16,Flat"
    assert found == np.argsort(-(queries @ embeddings.T), axis=1)[:, :5].tolist()


def test_unknown_factory_string_is_a_typed_error_and_leaves_no_directory(tmp_path):
    with pytest.raises(InvalidIndexConfig):
        write_index(
            tmp_path / "v1",
            synthetic_passages(10),
            random_unit(10, 8, 0),
            build_id="v1",
            encoder_fingerprint="random",
            config=IndexConfig(factory="NoSuchIndex99"),
        )
    assert not (tmp_path / "v1").exists()
    assert list(tmp_path.iterdir()) == []


def test_opening_with_another_embedding_width_is_a_dimension_mismatch(tmp_path):
    open_random(tmp_path, 20, 16)
    with pytest.raises(DimensionMismatch) as caught:
        IndexHandle.open(tmp_path / "v1", domain="news", embedding_dim=384)
    assert (caught.value.expected, caught.value.found) == (384, 16)
    assert caught.value.code == "dimension_mismatch"


def test_queries_of_another_width_are_a_dimension_mismatch(tmp_path):
    handle, _ = open_random(tmp_path, 20, 16)
    with pytest.raises(DimensionMismatch):
        handle.search(np.zeros((2, 8), dtype=np.float32), k=3, mode="dense")


def test_a_version_directory_is_never_overwritten(tmp_path):
    open_random(tmp_path, 20, 16)
    before = (tmp_path / "v1" / "build.json").read_text()
    with pytest.raises(FileExistsError):
        write_index(
            tmp_path / "v1",
            synthetic_passages(5),
            random_unit(5, 16, 9),
            build_id="v1",
            encoder_fingerprint="random",
        )
    assert (tmp_path / "v1" / "build.json").read_text() == before


def test_concurrent_searches_on_one_handle_agree_with_a_single_thread(tmp_path):
    handle, _ = open_random(tmp_path, 5000, 32, config=IndexConfig(factory="HNSW16"))
    queries = random_unit(64, 32, seed=5)
    expected = [[h.passage.id for h in row] for row in handle.search(queries, k=5, mode="dense")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(lambda i: handle.search(queries[i : i + 1], k=5, mode="dense")[0], range(64)))
    assert [[h.passage.id for h in row] for row in rows] == expected
