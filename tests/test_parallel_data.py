"""Pretraining batches through megatron-core's GPTDataset: layout-independent and resumable."""
import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from puyu.launcher.errors import PuyuError
from puyu.parallel.data import PretrainDataConfig, StepBatches, build_dataset

EOD = 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # a tiny synthetic shard (unit test); end-to-end tests use the data stage's real output
    root = tmp_path_factory.mktemp("shards")
    builder = IndexedDatasetBuilder(str(root / "part-00000.bin"), dtype=np.int32)
    rng = np.random.default_rng(0)
    for _ in range(300):
        doc = rng.integers(1, 97, size=int(rng.integers(4, 40))).tolist() + [EOD]
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(root / "part-00000.idx"))
    return build_dataset(PretrainDataConfig(paths=[str(root)], seq_len=16, eod_token=EOD), 400, vocab_size=97)


def flat(step):
    return torch.cat([b.tokens for b in step])


def test_data_parallel_ranks_split_the_single_rank_batch(dataset):
    single = StepBatches(dataset, global_batch=8, micro_batch=2, dp_rank=0, dp_size=1)
    ranks = [StepBatches(dataset, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        whole = flat(single.next_step())
        assert torch.equal(whole, torch.cat([flat(r.next_step()) for r in ranks]))


def test_resume_from_consumed_samples_sees_the_same_batches(dataset):
    straight = StepBatches(dataset, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1)
    steps = [flat(straight.next_step()) for _ in range(5)]
    resumed = StepBatches(dataset, global_batch=4, micro_batch=2, dp_rank=0, dp_size=1, consumed_samples=12)
    assert torch.equal(flat(resumed.next_step()), steps[3])


def test_labels_are_the_next_tokens(dataset):
    b = StepBatches(dataset, global_batch=4, micro_batch=4, dp_rank=0, dp_size=1).next_step()[0]
    assert b.tokens.shape == (4, 16) and torch.equal(b.labels[:, :-1], b.tokens[:, 1:])


def test_bad_batch_shape_and_missing_data_are_named(dataset, tmp_path):
    with pytest.raises(PuyuError, match="global batch 6 is not a multiple of micro_batch 2 × data-parallel size 2"):
        StepBatches(dataset, global_batch=6, micro_batch=2, dp_rank=0, dp_size=2)
    with pytest.raises(PuyuError, match="holds no .idx/.bin token shards"):
        build_dataset(PretrainDataConfig(paths=[str(tmp_path)]), 10, vocab_size=97)
