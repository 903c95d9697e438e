"""Issue 15's `prepare`: columnar splits, the lean tar writer, Parquet/CSV inputs, repeats, gzip shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llara_dist.cli import main
from llara_dist.data.prepare import run_prepare
from llara_dist.data.samples import (dedup_sequences, eval_candidates, record_dtype, shuffle_keys, split_positions,
                                     split_samples)
from llara_dist.data.shards import (compress_shard, load_meta, load_titles, read_split, tar_bytes, tar_columns,
                                    tar_members)
from llara_dist.data.sources import Interactions, generate_synthetic
from llara_dist.errors import DataError

from ..conftest import tiny_config


def _prepare(out: Path, *overrides: str) -> dict:
    run_prepare(tiny_config(f"prepare.out={out}", *overrides))
    return load_meta(out)


def _tarfile_reference(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("sizes", [[], [1], [0, 511, 512, 513], list(range(0, 3000, 97))])
def test_lean_tar_writer_is_byte_identical_to_tarfile(sizes):
    members = [(f"u{i}-t{3 * i}.json", bytes([65 + i % 26]) * n) for i, n in enumerate(sizes)]
    assert tar_members(members) == _tarfile_reference(members)


def test_columnar_splits_and_json_match_the_per_sample_reference():
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 40, size=int(rng.integers(0, 25))).tolist() for _ in range(60)]
    data = Interactions.from_sequences("t", "movie", [f"T{i}" for i in range(40)], seqs)
    assert data.sequences == seqs
    for history_len, min_history in [(10, 3), (4, 1), (2, 3), (30, 1)]:
        ref, ref_dropped = split_samples(seqs, history_len=history_len, min_history=min_history)
        index, dropped = split_positions(data.offsets, history_len=history_len, min_history=min_history)
        assert dropped == ref_dropped
        for split in ("train", "valid", "test"):
            users = np.searchsorted(data.offsets, index[split], side="right") - 1
            got = [(int(u), int(g - data.offsets[u])) for u, g in zip(users, index[split])]
            assert got == [(s["user"], int(s["key"].split("-t")[1])) for s in ref[split]]


def test_shard_json_is_json_dumps_of_the_sample(tmp_path):
    meta = _prepare(tmp_path / "s", "prepare.users=30", "prepare.items=40", "prepare.num_candidates=5")
    # the per-sample reference on the same synthetic data
    ref, _ = split_samples(generate_synthetic(30, 40, 0).sequences, history_len=10, min_history=3)
    for split in ("valid", "test"):
        entry = meta["shards"][split][0]
        with tarfile.open(tmp_path / "s" / entry["name"]) as tar:
            stored = [tar.extractfile(m).read() for m in tar.getmembers()]
        expect = []
        for s in ref[split]:
            s["candidates"] = eval_candidates(s, meta["n_items"], 5, 0)
            expect.append(json.dumps(s, separators=(",", ":")).encode())
        assert stored == expect


def test_default_prepare_keeps_the_per_sample_samples_and_its_eval_bytes(tmp_path):
    args = ("prepare.users=200", "prepare.items=120", "prepare.samples_per_shard=400")
    meta = _prepare(tmp_path / "s", *args)
    # valid/test: the very bytes the per-sample implementation wrote (commit 4c1ea9c)
    assert [e["sha256"] for e in meta["shards"]["valid"]] == [
        "a8ff88dfe599b11e6e6267bba80167f2f99b415eb1fd74fdce22459a457c71f5"]
    assert [e["sha256"] for e in meta["shards"]["test"]] == [
        "af44fdf7046dbf0d7129e72a3dc1f6c8be107815e58f15ec65ba5a296a3f6c7d"]
    # train: the same samples, stored in the order of their seeded per-sample keys
    ref, _ = split_samples(generate_synthetic(200, 120, 0).sequences, history_len=10, min_history=3)
    stored = list(read_split(tmp_path / "s", "train"))
    assert sorted(map(json.dumps, stored)) == sorted(map(json.dumps, ref["train"]))
    users = np.array([s["user"] for s in stored])
    pos = np.array([int(s["key"].split("-t")[1]) for s in stored])
    keys = shuffle_keys(0, users, pos)
    assert (keys[1:] >= keys[:-1]).all() and len(set(users[:400].tolist())) > 100  # mixed users
    assert meta["fingerprint"] == "ca570d458889dafe4100223fa91e006305fb47f53091d5f50afee7577bb85dd1"  # regression pin
    other_seed = _prepare(tmp_path / "seed1", *args, "prepare.seed=1")
    assert [s["key"] for s in read_split(tmp_path / "seed1", "train")] != [s["key"] for s in stored]


def test_parallel_writers_give_identical_bytes(tmp_path):
    args = ("prepare.users=80", "prepare.items=60", "prepare.samples_per_shard=150")
    a = _prepare(tmp_path / "a", *args, "prepare.workers=1")
    b = _prepare(tmp_path / "b", *args, "prepare.workers=2")
    assert a == b and len(a["shards"]["train"]) > 2
    for entries in a["shards"].values():
        for e in entries:
            assert (tmp_path / "a" / e["name"]).read_bytes() == (tmp_path / "b" / e["name"]).read_bytes()


# ----------------------------------------------------------------------------------------------
# Parquet and CSV


_ROWS = [("u1", 4, 30, "Brazil"), ("u1", 3, 20, "Alien"), ("u1", 2, 10, "Heat (1995)"), ("u1", 5, 40, "Fargo"),
         ("u1", 6, 50, "Memento"), ("u2", 7, 1, "Psycho"), ("u2", 6, 2, "Memento"), ("u2", 5, 3, "Fargo"),
         ("u2", 4, 4, "Brazil"), ("u2", 3, 5, "Alien")]
_BASE = ("prepare.num_candidates=2", "prepare.min_history=1")


def _recbole_dir(d: Path) -> Path:
    d.mkdir()
    (d / "toy.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                 + "".join(f"{u}\t{i}\t{t}\n" for u, i, t, _ in _ROWS))
    titles = {i: t for _, i, _, t in _ROWS}
    (d / "toy.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\t{t}\n" for i, t in titles.items()))
    return d


def test_parquet_and_csv_with_a_column_mapping_match_recbole(tmp_path):
    ref = _prepare(tmp_path / "rb", "prepare.format=recbole", f"prepare.input={_recbole_dir(tmp_path / 'in')}", *_BASE)
    table = pa.table({"who": [r[0] for r in _ROWS], "what": [r[1] for r in _ROWS],
                      "when": [float(r[2]) for r in _ROWS], "name": [r[3] for r in _ROWS]})
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(table.slice(0, 4), parts / "part-0.parquet")  # a directory of part files
    pq.write_table(table.slice(4), parts / "part-1.parquet")
    csv = tmp_path / "log.csv"
    csv.write_text("who,what,when,name\n" + "".join(f'{u},{i},{t},"{n}"\n' for u, i, t, n in _ROWS))
    mapping = ("prepare.user_field=who", "prepare.item_field=what", "prepare.time_field=when",
               "prepare.title_field=name")
    for fmt, src in (("parquet", parts), ("csv", csv)):
        out = tmp_path / fmt
        meta = _prepare(out, f"prepare.format={fmt}", f"prepare.input={src}", *mapping, *_BASE)
        assert load_titles(out) == load_titles(tmp_path / "rb") == ["Heat", "Alien", "Brazil", "Fargo", "Memento",
                                                                   "Psycho"]
        assert meta["counts"] == ref["counts"] and meta["n_users"] == 2
        for split in ("train", "valid", "test"):
            assert list(read_split(out, split)) == list(read_split(tmp_path / "rb", split))


def test_categorical_ids_and_datetime_columns_read_like_numbers(tmp_path):
    import datetime as dt

    ref = _prepare(tmp_path / "rb", "prepare.format=recbole", f"prepare.input={_recbole_dir(tmp_path / 'in')}", *_BASE)
    epoch = dt.datetime(2024, 5, 1, 12, 0, 0)
    when = [epoch + dt.timedelta(seconds=r[2], microseconds=250_000) for r in _ROWS]  # sub-second values
    table = pa.table({"user_id": pa.array([r[0] for r in _ROWS]).dictionary_encode(),  # pandas categoricals
                      "item_id": pa.array([str(r[1]) for r in _ROWS]).dictionary_encode(),
                      "timestamp": pa.array(when, pa.timestamp("ns")), "title": [r[3] for r in _ROWS]})
    pq.write_table(table, tmp_path / "cat.parquet")
    csv = tmp_path / "iso.csv"  # ISO-8601 strings, with and without a zone
    csv.write_text("user_id,item_id,timestamp,title\n" + "".join(
        f'{u},{i},{(epoch + dt.timedelta(seconds=t)).isoformat()}{"Z" if k % 2 else ""},"{n}"\n'
        for k, (u, i, t, n) in enumerate(_ROWS)))
    for fmt, src in (("parquet", tmp_path / "cat.parquet"), ("csv", csv)):
        meta = _prepare(tmp_path / fmt, f"prepare.format={fmt}", f"prepare.input={src}", *_BASE)
        assert meta["counts"] == ref["counts"]
        for split in ("train", "valid", "test"):
            assert list(read_split(tmp_path / fmt, split)) == list(read_split(tmp_path / "rb", split))


def test_malformed_parquet_and_csv_rows_are_named(tmp_path, capsys):
    good = {"user_id": ["a", "a", "b", "b"], "item_id": ["1", "2", "1", "2"], "timestamp": [1.0, 2.0, 1.0, 2.0],
            "title": ["X", "Y", "X", "Y"]}
    bad = dict(good, user_id=["a", "a", None, "b"])
    pq.write_table(pa.table(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet: row 3: user_id: expected a value"):
        _prepare(tmp_path / "o", "prepare.format=parquet", f"prepare.input={tmp_path / 'bad.parquet'}", *_BASE)
    (tmp_path / "t.csv").write_text("user_id,item_id,timestamp,title\na,1,1,X\na,2,soon,Y\n")
    with pytest.raises(DataError, match=r"t.csv: row 2: timestamp: expected a number or an ISO-8601 date/time, got 'soon'"):
        _prepare(tmp_path / "o", "prepare.format=csv", f"prepare.input={tmp_path / 't.csv'}", *_BASE)
    (tmp_path / "f.csv").write_text("user_id,item_id,timestamp,title\na,1,1,X\na,2,2\n")
    with pytest.raises(DataError, match=r"f.csv: row 2: expected 4 comma-separated fields"):
        _prepare(tmp_path / "o", "prepare.format=csv", f"prepare.input={tmp_path / 'f.csv'}", *_BASE)
    (tmp_path / "m.csv").write_text("user,item_id,timestamp,title\na,1,1,X\n")
    with pytest.raises(DataError, match=r"m.csv: missing user column 'user_id' \(set prepare.user_field"):
        _prepare(tmp_path / "o", "prepare.format=csv", f"prepare.input={tmp_path / 'm.csv'}", *_BASE)
    # through the CLI: exit code 2 and one line naming the file, row and field
    assert main(["prepare", "--format", "parquet", "--input", str(tmp_path / "bad.parquet"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.parquet: row 3: user_id" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# Repeated items: the report, prepare.dedup and prepare.negatives


def _repeat_log(d: Path) -> Path:
    """Users who re-consume items (LastFM/Steam style): consecutive and non-consecutive repeats."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(40):
        seq = rng.integers(0, 30, size=18).tolist()
        seq[5] = seq[4]  # at least one consecutive repeat per user
        rows += [(f"u{u}", str(i), t) for t, i in enumerate(seq)]
    d.mkdir()
    (d / "r.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                               + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows))
    (d / "r.item").write_text("item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tSong {i}\n" for i in range(30)))
    return d


def _in_history(samples: list[dict]) -> int:
    return sum(s["target"] in s["history"] for s in samples)


def test_repeats_are_reported_and_dedup_removes_them(tmp_path):
    src = _repeat_log(tmp_path / "in")
    base = ("prepare.format=recbole", f"prepare.input={src}", "prepare.num_candidates=4")
    meta = _prepare(tmp_path / "none", *base)
    data = {s: list(read_split(tmp_path / "none", s)) for s in ("train", "valid", "test")}
    rep = meta["repeats"]
    assert meta["dedup"] == "none" and meta["negatives"] == "unseen" and rep["removed_interactions"] == 0
    for split, samples in data.items():
        assert rep[split]["target_in_history"] == _in_history(samples) > 0
        assert rep[split]["target_in_history_rate"] == pytest.approx(_in_history(samples) / len(samples), abs=1e-6)
    for split in ("valid", "test"):  # unseen negatives: a target in the history is always the shortcut
        assert rep[split]["target_only_candidate_in_history"] == rep[split]["target_in_history"]
        for s in data[split]:
            assert not set(s["history"]) & (set(s["candidates"]) - {s["target"]})

    cons = _prepare(tmp_path / "cons", *base, "prepare.dedup=consecutive")
    assert cons["repeats"]["removed_interactions"] >= 40
    for split in ("train", "valid", "test"):
        for s in read_split(tmp_path / "cons", split):
            assert s["history"][-1] != s["target"]
            assert all(a != b for a, b in zip(s["history"], s["history"][1:]))
    every = _prepare(tmp_path / "all", *base, "prepare.dedup=all")
    assert every["repeats"]["removed_interactions"] > cons["repeats"]["removed_interactions"]
    for split in ("train", "valid", "test"):
        assert every["repeats"][split]["target_in_history"] == 0
        assert _in_history(list(read_split(tmp_path / "all", split))) == 0
    assert len({meta["fingerprint"], cons["fingerprint"], every["fingerprint"]}) == 3


def test_negatives_any_draws_history_items_and_removes_the_shortcut(tmp_path):
    src = _repeat_log(tmp_path / "in")
    meta = _prepare(tmp_path / "any", "prepare.format=recbole", f"prepare.input={src}", "prepare.num_candidates=6",
                    "prepare.negatives=any")
    assert meta["negatives"] == "any"
    test = list(read_split(tmp_path / "any", "test"))
    with_history_negatives = [s for s in test if set(s["history"]) & (set(s["candidates"]) - {s["target"]})]
    assert with_history_negatives  # 30 items, ~9 in a history: history items get drawn as negatives
    rep = meta["repeats"]["test"]
    assert rep["target_only_candidate_in_history"] < rep["target_in_history"]
    assert rep["target_only_candidate_in_history"] == sum(
        s["target"] in s["history"] and not set(s["history"]) & (set(s["candidates"]) - {s["target"]}) for s in test)
    # train-time candidates follow the same rule when the stream passes meta.json's `negatives`
    from llara_dist.data.samples import train_candidates

    drawn = [train_candidates(s, meta["n_items"], 6, 0, 0, negatives="any") for s in test]
    assert any(set(s["history"]) & (set(c) - {s["target"]}) for s, c in zip(test, drawn))
    assert all(c.count(s["target"]) == 1 and len(set(c)) == 6 for s, c in zip(test, drawn))


# ----------------------------------------------------------------------------------------------
# Compressed shards


def test_gzip_shards_are_read_by_webdataset_itself(tmp_path):
    import webdataset as wds

    args = ("prepare.users=50", "prepare.items=60", "prepare.samples_per_shard=200")
    plain = _prepare(tmp_path / "plain", *args)
    gz = _prepare(tmp_path / "gz", *args, "prepare.compression=gzip")
    assert gz["compression"] == "gzip" and gz["counts"] == plain["counts"]
    assert all(e["name"].endswith(".tar.gz") for v in gz["shards"].values() for e in v)
    again = _prepare(tmp_path / "gz2", *args, "prepare.compression=gzip")
    assert again["fingerprint"] == gz["fingerprint"]  # gzip with mtime 0: reproducible bytes
    size = {d: sum((tmp_path / d / e["name"]).stat().st_size for v in m["shards"].values() for e in v)
            for d, m in (("plain", plain), ("gz", gz))}
    assert size["gz"] < size["plain"] / 4  # ~1 KB of tar padding per sample compresses away
    for split in ("train", "test"):
        urls = [str(tmp_path / "gz" / e["name"]) for e in gz["shards"][split]]
        got = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        urls = [str(tmp_path / "plain" / e["name"]) for e in plain["shards"][split]]
        ref = [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
        assert got == ref and len(got) == plain["counts"][split]


# ----------------------------------------------------------------------------------------------
# Out of core: the bytes do not depend on how the work is cut


def test_bytes_do_not_depend_on_partitions_buckets_or_chunks(tmp_path, monkeypatch):
    import llara_dist.data.prepare as prepare_mod
    import llara_dist.data.sources as sources_mod

    src = _repeat_log(tmp_path / "in")  # a RecBole log: read through the on-disk partitions
    runs = {"rb": ("prepare.format=recbole", f"prepare.input={src}", "prepare.num_candidates=4",
                   "prepare.samples_per_shard=70"),
            "syn": ("prepare.users=90", "prepare.items=60", "prepare.samples_per_shard=130")}
    ref = {name: _prepare(tmp_path / f"{name}-ref", *args) for name, args in runs.items()}
    # many tiny pieces: 4 log partitions, 8 and 32 train buckets, 5 and 10 eval buckets, 13 synthetic chunks
    monkeypatch.setattr(sources_mod, "_PARTITION_ROWS", 100)
    monkeypatch.setattr(prepare_mod, "_TRAIN_BUCKET_RECORDS", 100)
    monkeypatch.setattr(prepare_mod, "_EVAL_BUCKET_USERS", 10)
    chunks = sources_mod.Interactions.chunks
    monkeypatch.setattr(sources_mod.Interactions, "chunks", lambda self, rows=150: chunks(self, rows))
    for name, args in runs.items():
        cut = _prepare(tmp_path / name, *args, "prepare.workers=2")
        assert cut == ref[name] and len(cut["shards"]["train"]) >= 4
        assert _in_bytes(tmp_path / name, cut) == _in_bytes(tmp_path / f"{name}-ref", ref[name])


def _in_bytes(d: Path, meta: dict) -> dict[str, bytes]:
    return {e["name"]: (d / e["name"]).read_bytes() for v in meta["shards"].values() for e in v}


def test_spill_keeps_append_order_within_a_bucket(tmp_path):
    from llara_dist.data.spill import Spill, top_bits_bucket

    sp = Spill(tmp_path, "t", np.dtype("<i8"), 4)
    sp.append(np.array([3, 0, 3, 1]), np.array([10, 11, 12, 13]))
    sp.append(np.array([3, 0]), np.array([14, 15]))
    assert [sp.read(b).tolist() for b in range(4)] == [[11, 15], [13], [], [10, 12, 14]]
    assert sp.counts.tolist() == [2, 1, 0, 3]
    keys = np.array([0, 1 << 62, (1 << 63) + 5, (1 << 64) - 1], dtype=np.uint64)
    assert top_bits_bucket(keys, 4).tolist() == [0, 1, 2, 3]
    assert top_bits_bucket(keys, 1).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("sizes", [[], [1], [0, 511, 512, 513], list(range(0, 3000, 97))])
def test_columnar_tar_writer_is_byte_identical_to_the_lean_one(sizes):
    members = [(f"u{i}-t{3 * i}" + "x" * (i % 80) + ".json", bytes([65 + i % 26]) * n) for i, n in enumerate(sizes)]
    got = tar_columns(pa.array([m[0] for m in members], pa.string()), pa.array([m[1] for m in members], pa.binary()))
    assert got == tar_members(members)


def test_columnar_tar_writer_rejects_names_of_100_bytes():
    with pytest.raises(ValueError, match="too long"):
        tar_columns(pa.array(["a.json", "b" * 95 + ".json"]), pa.array([b"{}", b"{}"]))


def _train_records(rng: np.random.Generator, n: int, history_len: int, high: int, lens: np.ndarray) -> np.ndarray:
    records = np.zeros(n, record_dtype(history_len))
    records["key"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    for field in ("user", "pos", "target"):
        records[field] = rng.integers(0, high, n)
    hist = rng.integers(0, high, (n, history_len))
    hist[np.arange(history_len)[None, :] < (history_len - lens)[:, None]] = -1  # left padding
    records["hist"] = hist
    return records


@pytest.mark.parametrize("history_len", [1, 2, 7, 20, 50])
@pytest.mark.parametrize("n", [0, 1, 2000])
def test_columnar_train_shards_are_the_per_sample_bytes(history_len, n):
    from llara_dist.data.prepare import ShardSpec, _members_per_sample, shard_file

    rng = np.random.default_rng(history_len * 7919 + n)
    for high in (50, 2**31 - 1):  # small ids (many targets in the history) and the widest int32s
        lens = rng.integers(0, history_len + 1, n)
        lens[: min(n, 2)] = [0, history_len][: min(n, 2)]  # both extremes, always
        records = _train_records(rng, n, history_len, high, lens)
        for compression in ("none", "gzip"):
            spec = ShardSpec(n_items=high, history_len=history_len, num_candidates=5, seed=3, negatives="unseen",
                             compression=compression)
            got, stats = shard_file(spec, "train", records)
            in_history = (records["hist"] == records["target"][:, None]).any(axis=1)
            ref_stats = {"target_in_history": int(in_history.sum()), "shortcut": 0}
            members = _members_per_sample(spec, "train", records, lens, in_history, ref_stats)
            assert got == compress_shard(tar_members(members), compression)
            assert stats == ref_stats
    if n:  # and the bytes still read back as `json.dumps` of each sample
        with tarfile.open(fileobj=io.BytesIO(shard_file(spec, "train", records)[0])) as tar:
            member = tar.getmembers()[-1]
            r = records[-1]
            history = r["hist"][history_len - lens[-1]:].tolist()
            key = f"u{r['user']}-t{r['pos']}"
            assert member.name == key + ".json"
            assert tar.extractfile(member).read() == json.dumps(
                {"key": key, "user": int(r["user"]), "history": history, "target": int(r["target"])},
                separators=(",", ":")).encode()


def test_columnar_train_shards_take_the_last_entries_of_malformed_histories():
    # `shard_file` counts the non-negative entries and keeps that many from the right; the columnar
    # path must do the same even if -1s are not only on the left (and for negative user ids)
    from llara_dist.data.prepare import ShardSpec, _members_per_sample, shard_file

    rng = np.random.default_rng(11)
    records = _train_records(rng, 300, 6, 1000, rng.integers(0, 7, 300))
    records["hist"][rng.random((300, 6)) < 0.3] = -1
    records["user"][::3] *= -1
    spec = ShardSpec(n_items=1000, history_len=6, num_candidates=5, seed=0, negatives="unseen", compression="none")
    lens = (records["hist"] >= 0).sum(axis=1)
    in_history = (records["hist"] == records["target"][:, None]).any(axis=1)
    members = _members_per_sample(spec, "train", records, lens, in_history, {"shortcut": 0})
    assert shard_file(spec, "train", records)[0] == tar_members(members)
