"""Sharded checkpoints: saved by 4 gloo ranks, loaded by 1 (no torch.distributed), 2 and 4 ranks
(and saved by 1, loaded by 4) with exactly the single process's state, and resumed bit for bit;
a second save replaces the first atomically (new shards, then the index, old shards removed);
damaged, missing or foreign files raise errors naming them, on every rank."""
import json
import os
import shutil

import pytest
import torch
from sharded_common import BURN_IN, EPS, N, assert_same_tensors, record, run_sharded, run_single, run_world, shard_of, \
    stream

from gdc_ext import ShardedCartoState
from gdc_ext.sharded import shard_bounds
from gdc_ext.sharded_checkpoint import INDEX_FILE, load_sharded, read_index, save_sharded

EPOCHS = 3


def _resume_one_epoch(state, rank, world):
    calls = stream(EPOCHS)
    for step in range(len(calls) // world):
        record(state, calls[step * world + rank])
    state.end_epoch()
    return state.state_dict()["local"]


def _save_worker(rank, world, folder):
    state = ShardedCartoState(N, BURN_IN, EPS)
    run_sharded(state, rank, world, EPOCHS)
    state.save(folder)
    first = sorted(os.listdir(folder))
    state.save(folder)  # a second save replaces the first
    return {"first": first, "second": sorted(os.listdir(folder)), "bounds": (state.start, state.stop)}


def _load_worker(rank, world, folders):
    out = {}
    for name, folder in folders.items():
        try:
            s = ShardedCartoState.load(folder)
        except (ValueError, OSError) as e:
            out[name] = f"{type(e).__name__}: {e}"
            continue
        out[name] = dict(loaded=s.state_dict()["local"], bounds=(s.start, s.stop), resumed=_resume_one_epoch(s, rank,
                                                                                                             world))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_ckpt")
    by4 = str(root / "by4")
    run_world(_save_worker, 4, root, by4)
    # a checkpoint saved by one process (no torch.distributed)
    by1 = str(root / "by1")
    state = ShardedCartoState(N, BURN_IN, EPS)
    run_sharded(state, 0, 1, EPOCHS)
    save_sharded(state, by1)
    # rank 1 of 2 reads a damaged shard: shard 3 of the 4-rank save
    damaged = str(root / "damaged")
    shutil.copytree(by4, damaged)
    index = read_index(damaged)
    path = os.path.join(damaged, index["shards"][3]["file"])
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x40
    open(path, "wb").write(bytes(data))
    return root, {"by4": by4, "by1": by1, "damaged": damaged}


@pytest.fixture(scope="module")
def single():
    _, after, _ = run_single(EPOCHS + 1)
    return after


@pytest.fixture(scope="module")
def loaded(saved):
    root, folders = saved
    out = {w: run_world(_load_worker, w, root / f"load{w}", {k: folders[k] for k in ("by4", "by1", "damaged")})
           for w in (2, 4)}
    return out


def test_a_second_save_replaces_the_first_atomically(saved):
    root, folders = saved
    files = sorted(os.listdir(folders["by4"]))
    assert INDEX_FILE in files and len(files) == 5, files  # 4 shards + the index, no temp left
    index = read_index(folders["by4"])
    assert [s["file"] for s in index["shards"]] == [f for f in files if f != INDEX_FILE]
    assert all(index["save_id"] in f for f in files if f != INDEX_FILE)


def test_four_rank_checkpoint_loads_in_one_process(saved, single):
    _, folders = saved
    s = load_sharded(folders["by4"])
    assert (s.world_size, s.start, s.stop) == (1, 0, N)
    assert_same_tensors(s.state_dict()["local"], shard_of(single[EPOCHS - 1], 0, N))
    assert_same_tensors(_resume_one_epoch(s, 0, 1), shard_of(single[EPOCHS], 0, N))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("saved_by", ["by4", "by1"])
def test_checkpoint_loads_in_other_world_sizes_and_resumes_exactly(loaded, single, world, saved_by):
    for rank, got in enumerate(loaded[world]):
        res = got[saved_by]
        assert isinstance(res, dict), res
        start, stop = res["bounds"]
        assert (start, stop) == shard_bounds(N, world, rank)
        assert_same_tensors(res["loaded"], shard_of(single[EPOCHS - 1], start, stop))
        assert_same_tensors(res["resumed"], shard_of(single[EPOCHS], start, stop))


def test_a_damaged_shard_fails_every_rank(loaded):
    got = [g["damaged"] for g in loaded[2]]
    assert "could not read their part" in got[0] and "[1]" in got[0], got[0]
    assert got[1].startswith("ValueError") and "shard-00003-of-00004" in got[1], got[1]
    got = [g["damaged"] for g in loaded[4]]
    assert "shard-00003-of-00004" in got[3] and all("could not read" in g for g in got[:3]), got


def test_damaged_or_missing_files_raise_naming_them(saved, tmp_path):
    _, folders = saved
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        load_sharded(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(folders["by4"], bad)
    index = json.loads((bad / INDEX_FILE).read_text())
    index["epochs_done"] += 1  # edited without its checksum
    (bad / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="damaged"):
        load_sharded(bad)
    shutil.rmtree(bad)
    shutil.copytree(folders["by4"], bad)
    first = read_index(bad)["shards"][0]["file"]
    os.unlink(bad / first)
    with pytest.raises(FileNotFoundError, match=first):
        load_sharded(bad)
    (bad / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a sharded-checkpoint index"):
        load_sharded(bad)
    with pytest.raises(ValueError, match="ShardedCartoState"):
        save_sharded(object(), tmp_path / "x")


def test_resharding_without_live_tensors_goes_through_state_dict(saved, single, monkeypatch):
    """The fallback for a CartoState whose tensors are not reachable by their state_dict names."""
    import gdc_ext.sharded_checkpoint as ck

    monkeypatch.setattr(ck, "_live_tensors", lambda state, keys: None)
    _, folders = saved
    s = load_sharded(folders["by4"])
    assert_same_tensors(s.state_dict()["local"], shard_of(single[EPOCHS - 1], 0, N))


def test_same_world_size_loads_its_own_file(saved, single):
    """A one-process checkpoint in one process: the shard file is read as the local state."""
    _, folders = saved
    s = ShardedCartoState.load(folders["by1"], flush_every=None)
    assert s.flush_every is None
    assert_same_tensors(s.state_dict()["local"], shard_of(single[EPOCHS - 1], 0, N))
    # state_dict / load_state_dict round trip on the same shard
    t = ShardedCartoState(N, BURN_IN, EPS)
    t.load_state_dict(s.state_dict())
    assert_same_tensors(t.state_dict()["local"], shard_of(single[EPOCHS - 1], 0, N))
    with pytest.raises(ValueError, match="num_samples"):
        ShardedCartoState(N + 1, BURN_IN, EPS).load_state_dict(s.state_dict())
    assert torch.equal(t.local.eps, s.local.eps)
