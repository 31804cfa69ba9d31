"""The S3 server going away under a serving process: questions are still answered from what is loaded, a
promotion is refused with 503 store_unavailable and moves nothing, /readyz says why, and once the store is
back the promotion goes through. The S3 server is a SeaweedFS process of this module's own, killed with
SIGKILL."""

from __future__ import annotations

import time

from tests.s3server import SeaweedS3
from tests.service.support import ADMIN, QUESTIONS, ingest_domain, publish_adapter, serve

ASK = {"question": QUESTIONS[0], "top_k": 2, "max_new_tokens": 3}


def test_a_store_outage_during_a_promotion_leaves_the_live_version_serving(
    tmp_path, make_settings, direct_backbone, store_of
):
    with SeaweedS3(tmp_path / "s3") as s3:
        config = s3.store_config()
        settings = make_settings(
            {
                "backend": "s3",
                "endpoint": config.endpoint,
                "bucket": config.bucket,
                "access_key": config.access_key,
                "secret_key": config.secret_key.get_secret_value(),
            },
            server={"poll_interval_s": 0.5},
        )
        store = store_of(settings)
        ingest_domain(store, direct_backbone, "alpha", tmp_path / "corpus")
        live, candidate = (
            publish_adapter(store, direct_backbone, "alpha", seed, tmp_path / "adapters") for seed in (1, 2)
        )
        with serve(settings) as served, served.client() as client:
            assert (
                client.post("/admin/domains/alpha/promote", headers=ADMIN, json={"version": live}).status_code
                == 200
            )
            before = client.post("/ask?domain=alpha", json=ASK).json()

            s3.kill()
            refused = client.post("/admin/domains/alpha/promote", headers=ADMIN, json={"version": candidate})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "store_unavailable" and int(refused.headers["retry-after"]) > 0
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["code"] == "store_unavailable"
            for _ in range(3):  # also across polls that fail to read the live pointer
                during = client.post("/ask?domain=alpha", json=ASK)
                assert during.status_code == 200, during.text
                assert (during.json()["adapter_version"], during.json()["answer"]) == (live, before["answer"])
                time.sleep(0.6)

            s3.start()
            assert client.get("/domains/alpha").json()["live"]["adapter_version"] == live  # nothing moved
            promoted = client.post("/admin/domains/alpha/promote", headers=ADMIN, json={"version": candidate})
            assert promoted.status_code == 200, promoted.text
            assert client.post("/ask?domain=alpha", json=ASK).json()["adapter_version"] == candidate
            assert client.get("/readyz").status_code == 200
