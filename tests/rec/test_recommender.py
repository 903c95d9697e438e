"""The conventional recommenders, end to end on real shards (`tiny_shards`): training, export,
the table check the LLM side relies on, and candidate scoring."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llara_dist.cli import main
from llara_dist.data.shards import load_meta, read_split
from llara_dist.errors import DataError
from llara_dist.recommender.arrays import samples_to_arrays
from llara_dist.recommender.scoring import load_recommender, popularity_scores, score_candidates
from llara_dist.recommender.table import load_item_table
from llara_dist.recommender.train import run_train_rec
from ..conftest import TINY_CONFIG, tiny_config


def _train(shards, out, *overrides):
    return run_train_rec(tiny_config(f"data.shards={shards}", f"rec.out={out}", *overrides), progress=False)


def test_export_shapes_and_padding_row(tiny_rec, tiny_shards):
    meta = load_meta(tiny_shards)
    n = meta["n_items"]
    table, rec_meta = load_item_table(tiny_rec, meta)
    assert table.shape == (n + 1, 64) and table.dtype == np.float32
    assert np.all(table[n] == 0), "row n_items is the padding row"
    assert np.abs(table[:n]).sum(axis=1).min() > 0, "every real item has a trained row"
    # The table is the model's own (tied) item embedding, not a copy that could drift.
    weights = load_file(str(tiny_rec / "model.safetensors"))
    np.testing.assert_array_equal(weights["item_embeddings.weight"], table)
    assert rec_meta["model"] == "sasrec" and rec_meta["dim"] == 64 and rec_meta["n_items"] == n
    assert rec_meta["shards_fingerprint"] == meta["fingerprint"]
    metrics = json.loads((tiny_rec / "metrics.json").read_text())
    assert metrics["test"]["n"] == meta["counts"]["test"]
    assert rec_meta["metrics"]["test"] == metrics["test"]


def test_table_mismatch_is_refused(tiny_rec, tiny_shards, tmp_path):
    meta = load_meta(tiny_shards)
    with pytest.raises(DataError, match=r"n_items=%d.*expected \[%d, d\]" % (meta["n_items"] + 5, meta["n_items"] + 6)):
        load_item_table(tiny_rec, {**meta, "n_items": meta["n_items"] + 5})
    with pytest.raises(DataError, match="does not match the shards' fingerprint"):
        load_item_table(tiny_rec, {**meta, "fingerprint": "0" * 64})

    # A table file whose size disagrees with its own rec_meta (e.g. copied over from another run).
    bad = tmp_path / "rec"
    shutil.copytree(tiny_rec, bad)
    table = load_file(str(bad / "item_embeddings.safetensors"))["item_embeddings"]
    save_file({"item_embeddings": table[:-3]}, str(bad / "item_embeddings.safetensors"))
    with pytest.raises(DataError, match="item_embeddings.safetensors: item table has shape"):
        load_item_table(bad, meta)
    with pytest.raises(DataError, match="nowhere.*: not found"):
        load_item_table(tmp_path / "nowhere", meta)


def test_table_read_through_a_non_local_filesystem(tiny_rec, tiny_shards):
    """train.rec_dir on object storage: the table and its checks go through pyarrow.fs, not the local disk."""
    fsspec = pytest.importorskip("fsspec")
    import pyarrow.fs as pafs

    from llara_dist.data.storage import ShardDir

    mem, root = fsspec.filesystem("memory"), "/bucket/llara-table-test"
    for name in ("item_embeddings.safetensors", "rec_meta.json", "model.safetensors"):
        mem.pipe(f"{root}/{name}", (tiny_rec / name).read_bytes())
    remote = ShardDir.on(pafs.PyFileSystem(pafs.FSSpecHandler(mem)), root)
    try:
        meta = load_meta(tiny_shards)
        table, rec_meta = load_item_table(remote, meta)
        np.testing.assert_array_equal(table, load_item_table(tiny_rec, meta)[0])
        assert rec_meta["shards_fingerprint"] == meta["fingerprint"]
        # The recommender beside it (eval's baseline) loads through the same filesystem, same scores.
        samples = list(read_split(tiny_shards, "test"))[:8]
        remote_model, _ = load_recommender(remote)
        local_model, _ = load_recommender(tiny_rec)
        for a, b in zip(remote_model.state_dict().values(), local_model.state_dict().values()):
            assert torch.equal(a, b)
        np.testing.assert_array_equal(score_candidates(tiny_rec, samples), score_candidates(remote, samples))
        with pytest.raises(DataError, match="does not match the shards' fingerprint"):
            load_item_table(remote, {**meta, "fingerprint": "0" * 64})
        mem.pipe(f"{root}/item_embeddings.safetensors", b"not a safetensors file")
        with pytest.raises(DataError, match="llara-table-test/item_embeddings.safetensors: not a readable"):
            load_item_table(remote, meta)
        mem.rm(f"{root}/rec_meta.json")
        with pytest.raises(DataError, match="llara-table-test/rec_meta.json: not found"):
            load_item_table(remote, meta)
    finally:
        mem.rm(root, recursive=True)
    # A URI string is opened through pyarrow's own filesystems (file:// here; s3:// and gs:// alike).
    assert load_item_table(f"file://{tiny_rec}", meta)[0].shape == table.shape


def test_same_seed_same_table(tiny_shards, tmp_path):
    a = _train(tiny_shards, tmp_path / "a", "rec.epochs=2", "rec.model=gru4rec", "rec.seed=3")
    b = _train(tiny_shards, tmp_path / "b", "rec.epochs=2", "rec.model=gru4rec", "rec.seed=3")
    c = _train(tiny_shards, tmp_path / "c", "rec.epochs=2", "rec.model=gru4rec", "rec.seed=4")
    ta, tb, tc = (load_file(str(tmp_path / d / "item_embeddings.safetensors"))["item_embeddings"] for d in "abc")
    np.testing.assert_array_equal(ta, tb)
    assert a["loss_history"] == b["loss_history"] and a["test"] == b["test"]
    assert not np.array_equal(ta, tc)


@pytest.mark.parametrize("model,loss", [("sasrec", "ce"), ("gru4rec", "ce"), ("caser", "ce"), ("gru4rec", "bce")])
def test_learns_sequential_signal_beyond_popularity(model, loss, tiny_shards, tmp_path):
    # Through the CLI, as a user runs it.
    out = tmp_path / model
    rc = main(["train-rec", "--config", str(TINY_CONFIG), "--data", str(tiny_shards), "--model", model,
               "--out", str(out), "--epochs", "15", "rec.patience=15", f"rec.loss={loss}"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    pop = m["popularity"]["test"]["hr@1"]
    # 20 candidates: chance is 0.05. The synthetic chains are learnable, popularity cannot see them.
    assert m["test"]["hr@1"] > pop + 0.25, (model, m["test"], pop)
    assert m["valid"]["hr@1"] == max(m["valid_hr1_history"])  # the best valid epoch was kept


def test_evaluation_uses_exactly_the_stored_candidates(tiny_rec, tiny_shards):
    samples = list(read_split(tiny_shards, "test"))
    meta = load_meta(tiny_shards)
    scores = score_candidates(tiny_rec, samples)
    assert scores.shape == (len(samples), meta["num_candidates"])

    # Each column is the full-catalogue score of that stored candidate, in stored order.
    model, rec_meta = load_recommender(tiny_rec)
    arrays = samples_to_arrays(samples, meta["n_items"], meta["history_len"], where="t", with_candidates=True)
    with torch.no_grad():
        full = model(torch.from_numpy(arrays.seq)).numpy()
    expected = np.take_along_axis(full, np.array([s["candidates"] for s in samples]), axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)

    # The reported test HR@1 is the one these stored-candidate scores give (no ties among floats).
    top = [s["candidates"][int(np.argmax(row))] for s, row in zip(samples, scores)]
    hr = np.mean([t == s["target"] for t, s in zip(top, samples)])
    assert rec_meta["metrics"]["test"]["hr@1"] == pytest.approx(hr)

    # Different candidates give different scores: nothing is re-drawn inside the scorer.
    swapped = [{**s, "candidates": s["candidates"][::-1]} for s in samples]
    np.testing.assert_allclose(score_candidates(tiny_rec, swapped), scores[:, ::-1], rtol=1e-5, atol=1e-5)

    pop = popularity_scores(tiny_shards, samples)
    assert pop.shape == scores.shape and (pop >= 0).all()


def test_out_of_range_item_is_refused(tiny_rec):
    sample = {"key": "u1-t5", "history": [1, 2, 999], "target": 3, "candidates": [3, 4]}
    with pytest.raises(DataError, match="u1-t5: item id 999 out of range"):
        score_candidates(tiny_rec, [sample])
    with pytest.raises(DataError, match="target 3 must appear exactly once"):
        score_candidates(tiny_rec, [{**sample, "history": [1, 2], "candidates": [4, 5]}])


def test_unusable_device_is_a_config_error(tiny_shards, tmp_path):
    from llara_dist.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="rec.device: 'cuda' requested"):
        _train(tiny_shards, tmp_path, "rec.device=cuda")
