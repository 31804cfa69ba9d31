"""Passage encoding for builds: same vectors as the backbone, order restored, resumable by shard."""

import numpy as np
import pytest
import torch

from backbone import Passage
from indexing.encoder import EncodeConfig, encode_passages
from indexing.errors import RebuildCancelled


@pytest.fixture(scope="module")
def passages() -> list[Passage]:
    # Lengths vary a lot so that length sorting reorders the batches.
    return [
        Passage(f"p{i}", f"title {i}", " ".join(["the capital of france is paris"] * (1 + (i * 7) % 9)))
        for i in range(40)
    ]


def reference(backbone, passages, adapter=None) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([backbone.encode_passages([p], adapter) for p in passages]).numpy()  # [n, dim]


def test_length_sorted_batches_give_the_backbone_vectors_in_corpus_order(tiny_backbone, passages):
    encoded = encode_passages(tiny_backbone, passages, config=EncodeConfig(batch_size=8, progress=False))
    assert encoded.shape == (40, tiny_backbone.embedding_dim) and encoded.dtype == np.float32
    np.testing.assert_allclose(encoded, reference(tiny_backbone, passages), atol=1e-5)


def test_a_restarted_encode_skips_finished_shards(tiny_backbone, passages, tmp_path):
    config = EncodeConfig(batch_size=4, shard_size=16, progress=False)
    seen = []
    with pytest.raises(RebuildCancelled):
        encode_passages(
            tiny_backbone,
            passages,
            config=config,
            work_dir=tmp_path,
            on_progress=lambda done, total: seen.append(done),
            should_stop=lambda: len(seen) >= 5,
        )
    assert seen == [4, 8, 12, 16, 20]  # the first shard (16) finished, the second was cut short
    resumed = []
    encoded = encode_passages(
        tiny_backbone,
        passages,
        config=config,
        work_dir=tmp_path,
        on_progress=lambda done, total: resumed.append(done),
    )
    assert resumed[0] == 16  # the finished shard is taken whole, not re-encoded batch by batch
    assert resumed[-1] == 40
    np.testing.assert_allclose(encoded, reference(tiny_backbone, passages), atol=1e-5)
    assert list(tmp_path.iterdir()) == []  # shards are cleared once the encode is complete


def test_shards_of_another_adapter_or_corpus_are_not_reused(tiny_backbone, passages, tmp_path):
    config = EncodeConfig(batch_size=4, shard_size=16, progress=False, keep_shards=True)
    encode_passages(tiny_backbone, passages, config=config, work_dir=tmp_path)
    tiny_backbone.add_adapter_set("encoder-test")
    with torch.no_grad():
        for param in tiny_backbone.trainable_parameters("encoder-test")["passage"]:
            param.add_(torch.randn_like(param) * 0.5)
    adapted = []
    encoded = encode_passages(
        tiny_backbone,
        passages,
        adapter="encoder-test",
        config=config,
        work_dir=tmp_path,
        on_progress=lambda done, total: adapted.append(done),
    )
    assert adapted[0] == 4  # encoded from scratch
    np.testing.assert_allclose(encoded, reference(tiny_backbone, passages, "encoder-test"), atol=1e-5)
    assert not np.allclose(encoded, reference(tiny_backbone, passages))
    changed = [*passages[:-1], Passage("p39", "title 39", "a different last passage")]
    fresh = []
    encode_passages(
        tiny_backbone,
        changed,
        config=config,
        work_dir=tmp_path,
        on_progress=lambda done, total: fresh.append(done),
    )
    assert fresh[0] == 4
    assert len(list(tmp_path.glob("shards-*"))) == 3


def test_a_damaged_shard_is_encoded_again(tiny_backbone, passages, tmp_path):
    config = EncodeConfig(batch_size=8, shard_size=16, progress=False, keep_shards=True)
    encode_passages(tiny_backbone, passages, config=config, work_dir=tmp_path)
    [shard] = tmp_path.glob("shards-*/shard-00001.npy")
    np.save(shard, np.zeros((3, 3), dtype=np.float32))
    encoded = encode_passages(tiny_backbone, passages, config=config, work_dir=tmp_path)
    np.testing.assert_allclose(encoded, reference(tiny_backbone, passages), atol=1e-5)
