"""The dynamic mixture: frequencies follow p (and its updates), passes reshuffle, state resumes, bad config."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from drprune.data.loaders import build_eval_dataloader, build_train_dataloader, validate_data_config
from drprune.data.testing import write_synthetic_mds
from drprune.errors import ConfigError
from drprune.run_config import RunConfig

NAMES = ["a", "b", "c"]
CHI2_DF2_P001 = 13.816  # chi-square critical value, 2 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_mds(tmp_path_factory.mktemp("mix") / "data",
                               {"a": "random", "b": "repetitive", "c": "random"},
                               seq_len=8, vocab_size=300, n_train=60, n_eval=3)


def cfg_for(root, workers=0, **data_loading):
    node = {"dynamic": True, "set_names": NAMES, "proportion": [0.5, 0.3, 0.2], **data_loading}
    return OmegaConf.create({
        "data_local": str(root), "max_seq_len": 8, "seed": 5, "max_duration": "10ba", "global_train_batch_size": 8,
        "train_loader": {"num_workers": workers, "dataset": {"split": "train"}},
        "eval_loader": {"num_workers": 0, "dataset": {"split": "eval_merge"}},
        "callbacks": {"data_loading": node},
    })


def data_of(cfg):
    """The data section the loaders take, read the way a run reads it."""
    return RunConfig.from_cfg(cfg).data


def chi2(sets: np.ndarray, p: list[float]) -> float:
    observed = np.bincount(sets, minlength=len(p))
    expected = np.asarray(p) * len(sets)
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("workers", [0, 2])
def test_domain_frequencies_follow_p_and_its_updates(root, workers):
    loader = build_train_dataloader(data_of(cfg_for(root, workers)), 8)
    lag = loader.dataset.lag_batches
    assert lag == 2 * workers
    before, after = [], []
    for i, batch in enumerate(loader):
        assert batch["input_ids"].dtype.is_floating_point is False and batch["input_ids"].shape == (8, 8)
        (before if i < 150 else after).append(batch["set"].numpy())
        if i == 149:
            loader.dataset.update_proportion([0.1, 0.2, 0.7])
            assert loader.dataset.proportion == pytest.approx([0.1, 0.2, 0.7])
        if i == 149 + lag + 150:
            break
    assert chi2(np.concatenate(before), [0.5, 0.3, 0.2]) < CHI2_DF2_P001
    # The lag window still runs on the old p; from then on the new p holds.
    if lag:
        assert chi2(np.concatenate(after[:lag]), [0.5, 0.3, 0.2]) < CHI2_DF2_P001
    new = np.concatenate(after[lag:])
    assert len(new) == 1200
    assert chi2(new, [0.1, 0.2, 0.7]) < CHI2_DF2_P001
    assert chi2(new, [0.5, 0.3, 0.2]) > 100  # the test can tell the two apart


def test_stream_is_the_same_for_any_number_of_workers(root):
    streams = []
    for workers in (0, 2):
        loader = build_train_dataloader(data_of(cfg_for(root, workers)), 4)
        streams.append([b["idx"].tolist() for _, b in zip(range(12), loader)])
    assert streams[0] == streams[1]


def test_exhausted_domain_starts_a_reshuffled_pass_without_repeats(root, caplog):
    loader = build_train_dataloader(data_of(cfg_for(root, proportion=[0.0, 0.0, 1.0])), 6)
    with caplog.at_level(logging.INFO, logger="drprune.data.mixture_dataset"):
        ids = np.concatenate([b["idx"].numpy() for _, b in zip(range(30), loader)])  # 180 draws = 3 passes
    passes = ids.reshape(3, 60)
    for one in passes:
        assert sorted(one) == list(range(120, 180))  # every sample of c exactly once per pass
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])
    assert sum("domain c exhausted" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resumes_the_stream_and_the_pending_p(root, workers):
    cfg = cfg_for(root, workers)
    loader = build_train_dataloader(data_of(cfg), 4)
    ids = []
    for i, batch in enumerate(loader):
        ids.append(batch["idx"].tolist())
        if i == 2:
            loader.dataset.update_proportion([0.0, 1.0, 0.0])
        if i == 4:
            state = loader.dataset.state_dict(5 * 4, True)
        if i == 14:
            break
    assert len(str(state)) < 500  # counters and seeds, not id lists
    resumed = build_train_dataloader(data_of(cfg), 4)
    resumed.dataset.load_state_dict(state)
    assert resumed.dataset.proportion == [0.0, 1.0, 0.0]
    again = [b["idx"].tolist() for _, b in zip(range(10), resumed)]
    assert again == ids[5:15]


def test_eval_loader_sets_follow_set_names_order(root):
    cfg = cfg_for(root)
    cfg.callbacks.data_loading.set_names = ["c", "a", "b"]
    cfg.callbacks.data_loading.proportion = [0.2, 0.5, 0.3]
    sets = np.concatenate([b["set"].numpy() for b in build_eval_dataloader(data_of(cfg), 4)])
    assert sets.tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0]  # eval_merge is written a, b, c


@pytest.mark.parametrize("change, message", [
    ({"set_names": ["a", "b", "x"]}, "set_names ['x'] have no folder"),
    ({"proportion": [0.5, 0.5]}, "proportion has 2 entries but set_names has 3"),
    ({"proportion": [0.5, 0.3, 0.3]}, "sums to 1.100000"),
    ({"proportion": [1.2, -0.1, -0.1]}, "non-negative"),
    ({"set_names": ["a", "a", "b"]}, "duplicates"),
])
def test_bad_mixture_config_is_a_clear_error(root, change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_data_config(data_of(cfg_for(root, **change)))


def test_bad_paths_and_durations_are_clear_errors(root, tmp_path):
    with pytest.raises(ConfigError, match="data_local=.* is not a folder"):
        validate_data_config(data_of(cfg_for(tmp_path / "nope")))
    cfg = cfg_for(root)
    cfg.eval_loader.dataset.split = "eval_all"
    with pytest.raises(ConfigError, match="eval_loader.dataset.split='eval_all'"):
        validate_data_config(data_of(cfg))
    cfg = cfg_for(root)
    cfg.max_duration = "1ep"
    with pytest.raises(ConfigError, match="no epochs"):
        validate_data_config(data_of(cfg))
    cfg = cfg_for(root)
    cfg.max_seq_len = 16
    with pytest.raises(ConfigError, match="8-token sequences"):
        validate_data_config(data_of(cfg))


def test_non_dynamic_config_reads_the_split(root):
    cfg = cfg_for(root)
    del cfg.callbacks
    validate_data_config(data_of(cfg))
    loader = build_train_dataloader(data_of(cfg), 4)
    ids = np.concatenate([b["idx"].numpy() for b in loader])
    assert sorted(ids) == list(range(180)) and ids.tolist() != sorted(ids)
