"""POST /ask on a real server over a local and an S3 store: per-domain adapters, promotion under traffic."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from storage import open_store
from tests.service.support import ADMIN, QUESTIONS, ingest_domain, publish_adapter, serve

GENERATE = {"top_k": 3, "max_new_tokens": 8}
ASK = {**GENERATE, "retrieval": "dense"}


def test_concurrent_domains_each_get_their_own_adapter(
    store_settings, make_settings, direct_backbone, direct, tmp_path
):
    settings = make_settings(store_settings)
    store = open_store(settings.store_config)
    versions = {}
    for seed, name in enumerate(("alpha", "beta"), start=1):
        ingest_domain(store, direct_backbone, name, tmp_path / "corpus")
        versions[name] = publish_adapter(store, direct_backbone, name, seed, tmp_path / "adapters")
    with serve(settings) as served, served.client() as client:
        for name, version in versions.items():
            promoted = client.post(f"/admin/domains/{name}/promote", json={"version": version}, headers=ADMIN)
            assert promoted.status_code == 200, promoted.text
            assert promoted.json()["live"]["adapter_version"] == version

        with ThreadPoolExecutor(12) as pool:
            asked = [
                (
                    name,
                    question,
                    pool.submit(client.post, f"/ask?domain={name}", json={"question": question, **ASK}),
                )
                for question in QUESTIONS
                for name in versions
            ]
        pipeline = direct(store)
        answers: dict[str, dict[str, str]] = {name: {} for name in versions}
        for name, question, future in asked:
            response = future.result()
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["domain"] == name
            assert body["adapter_version"] == versions[name]
            handle = served.runtime.loaded.catalog.find(name).index
            assert body["index_version"] == handle.version
            assert body["answer"] == pipeline.answer(handle, question, name, versions[name], **GENERATE)
            assert len(body["passages"]) == GENERATE["top_k"]
            answers[name][question] = body["answer"]
    # The adapters change what is generated: the two domains answer the same questions differently.
    assert sum(answers["alpha"][q] != answers["beta"][q] for q in QUESTIONS) >= len(QUESTIONS) // 2


def test_promotion_mid_traffic_switches_versions_without_failures(
    store_settings, make_settings, direct_backbone, direct, tmp_path
):
    settings = make_settings(store_settings)
    store = open_store(settings.store_config)
    ingest_domain(store, direct_backbone, "alpha", tmp_path / "corpus")
    old = publish_adapter(store, direct_backbone, "alpha", 11, tmp_path / "adapters")
    new = publish_adapter(store, direct_backbone, "alpha", 12, tmp_path / "adapters")
    with serve(settings) as served, served.client() as client:
        first = client.post("/admin/domains/alpha/promote", json={"version": old}, headers=ADMIN)
        assert first.status_code == 200, first.text
        handle = served.runtime.loaded.catalog.find("alpha").index
        pipeline = direct(store)
        expected = {
            version: {q: pipeline.answer(handle, q, "alpha", version, **GENERATE) for q in QUESTIONS}
            for version in (old, new)
        }
        assert expected[old] != expected[new]

        results, stop = [], threading.Event()

        def traffic(offset: int) -> None:
            i = offset
            while not stop.is_set():
                question = QUESTIONS[i % len(QUESTIONS)]
                sent = time.monotonic()
                response = client.post("/ask?domain=alpha", json={"question": question, **ASK})
                results.append((question, response.status_code, response.json(), sent))
                i += 1

        threads = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        promoted = client.post("/admin/domains/alpha/promote", json={"version": new}, headers=ADMIN)
        promoted_at = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join()
        assert promoted.status_code == 200, promoted.text

        assert results and all(status == 200 for _, status, _, _ in results), [
            body for _, status, body, _ in results if status != 200
        ][:3]
        for question, _, body, _ in results:
            assert body["answer"] == expected[body["adapter_version"]][question]
        seen = [body["adapter_version"] for *_, body, _ in results]
        assert old in seen and new in seen
        # Requests sent once the promotion has answered are all on the new version.
        after = [body["adapter_version"] for _, _, body, sent in results if sent > promoted_at]
        assert after and set(after) == {new}
