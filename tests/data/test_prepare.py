"""`llara-dist prepare` through the real code: sources, splits, candidates, deterministic shards."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from llara_dist.cli import main
from llara_dist.data.prepare import run_prepare
from llara_dist.data.shards import load_meta, load_titles, read_split, read_split_part, train_candidates
from llara_dist.data.sources import _NOUNS, normalize_title, synthetic_titles
from llara_dist.errors import DataError

from ..conftest import tiny_config


def _prepare(out: Path, *overrides: str) -> dict:
    run_prepare(tiny_config(f"prepare.out={out}", *overrides))
    return load_meta(out)


def _all(shard_dir) -> dict[str, list[dict]]:
    return {s: list(read_split(shard_dir, s)) for s in ("train", "valid", "test")}


def test_synthetic_titles_unique_readable_and_never_substrings():
    import numpy as np

    for n in (120, 3000):  # two-word and three-word title forms
        titles = synthetic_titles(n, np.random.default_rng(0))
        assert len(set(titles)) == n
        low = [t.lower() for t in titles]
        joined = "\n".join(low)
        for t in low:  # each title occurs exactly once in the newline-joined list
            assert joined.count(t) == 1, t
    for a in _NOUNS:  # the property the argument relies on
        assert not any(b != a and b.startswith(a) for b in _NOUNS), a


def test_normalize_title():
    assert normalize_title("Usual Suspects, The (1995)") == "The Usual Suspects"
    assert normalize_title("Bug's Life, A") == "A Bug's Life"
    assert normalize_title("Affair to Remember, An (1957)") == "An Affair to Remember"
    assert normalize_title("  Toy   Story (1995) ") == "Toy Story"
    assert normalize_title("Theory of Everything") == "Theory of Everything"


def test_shards_contract_and_splits_do_not_leak(tiny_shards):
    meta = load_meta(tiny_shards)
    titles = load_titles(tiny_shards)
    assert len(titles) == meta["n_items"] and len(set(titles)) == len(titles)
    data = _all(tiny_shards)
    assert {s: len(v) for s, v in data.items()} == meta["counts"]
    assert len(meta["shards"]["train"]) >= 2  # samples_per_shard=400 in the fixture
    for split, entries in meta["shards"].items():
        for e in entries:
            assert hashlib.sha256((tiny_shards / e["name"]).read_bytes()).hexdigest() == e["sha256"]

    keys = [s["key"] for v in data.values() for s in v]
    assert len(keys) == len(set(keys))
    by_user: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for split, samples in data.items():
        for s in samples:
            pos = int(s["key"].split("-t")[1])
            by_user[s["user"]][split].append((pos, s))
            assert meta["min_history"] <= len(s["history"]) <= meta["history_len"]
    for user, splits in by_user.items():
        (t_pos, test), = splits["test"]
        (v_pos, valid), = splits["valid"]
        assert v_pos == t_pos - 1
        # valid's history + target is a prefix of test's view of the sequence
        assert test["history"][-1] == valid["target"]
        assert test["history"][-2] == valid["history"][-1]
        for pos, s in splits["train"]:
            assert pos < v_pos
            # nothing of valid/test leaks into train
            assert valid["target"] not in s["history"] + [s["target"]]
            assert test["target"] not in s["history"] + [s["target"]]


def test_eval_candidates_are_valid_and_train_candidates_are_seeded(tiny_shards):
    meta = load_meta(tiny_shards)
    c = meta["num_candidates"]
    for split in ("valid", "test"):
        for s in read_split(tiny_shards, split):
            cands = s["candidates"]
            assert len(cands) == c == len(set(cands))
            assert cands.count(s["target"]) == 1
            assert not set(cands) & (set(s["history"]) - {s["target"]})
    # train candidates: a pure function of (seed, epoch, key)
    sample = next(read_split(tiny_shards, "train"))
    a = train_candidates(sample, meta["n_items"], c, seed=3, epoch=0)
    assert a == train_candidates(dict(sample), meta["n_items"], c, seed=3, epoch=0)
    assert a != train_candidates(sample, meta["n_items"], c, seed=3, epoch=1)
    assert a.count(sample["target"]) == 1 and not set(a) & set(sample["history"])
    # the target's position is spread over the list, not always first or last
    positions = Counter(train_candidates(sample, meta["n_items"], c, 3, e).index(sample["target"]) for e in range(60))
    assert len(positions) > 5


def test_synthetic_has_learnable_sequential_structure(tiny_shards):
    """A next-item bigram model beats popularity by a wide margin on the stored test candidates."""
    pop, bigram = Counter(), defaultdict(Counter)
    for s in read_split(tiny_shards, "train"):
        pop[s["target"]] += 1
        bigram[s["history"][-1]][s["target"]] += 1
    test = list(read_split(tiny_shards, "test"))
    hit_pop = sum(max(s["candidates"], key=lambda i: pop[i]) == s["target"] for s in test) / len(test)
    hit_seq = sum(max(s["candidates"], key=lambda i: (bigram[s["history"][-1]][i], pop[i])) == s["target"]
                  for s in test) / len(test)
    assert hit_seq > 0.4 and hit_seq > 3 * hit_pop, (hit_seq, hit_pop)


def test_read_split_part_is_disjoint_and_covers(tiny_shards):
    full = [s["key"] for s in read_split(tiny_shards, "test")]
    parts = [[s["key"] for s in read_split_part(tiny_shards, "test", r, 3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(full)
    assert parts[1] == full[1::3]


def test_prepare_is_deterministic_and_seeded(tmp_path):
    args = ("prepare.users=60", "prepare.items=50", "prepare.samples_per_shard=100")
    a = _prepare(tmp_path / "a", *args)
    b = _prepare(tmp_path / "b", *args)
    assert a == b
    for entries in a["shards"].values():
        for e in entries:
            assert (tmp_path / "a" / e["name"]).read_bytes() == (tmp_path / "b" / e["name"]).read_bytes()
    c = _prepare(tmp_path / "c", *args, "prepare.seed=1")
    assert c["fingerprint"] != a["fingerprint"]
    # re-preparing into a used directory leaves no stale shards behind
    _prepare(tmp_path / "a", "prepare.users=60", "prepare.items=50", "prepare.samples_per_shard=1000")
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == ["test-000000.tar", "train-000000.tar",
                                                                      "valid-000000.tar"]


def _write_recbole(d: Path, inter: str, item: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "toy.inter").write_text(inter)
    (d / "toy.item").write_text(item)
    return d


_ITEMS = ("item_id:token\tmovie_title:token_seq\trelease_year:token\n"
          "10\tUsual Suspects, The\t1995\n2\tHeat (1995)\t1995\n3\tAlien\t1979\n4\tBrazil\t1985\n"
          "5\tFargo\t1996\n6\tMemento\t2000\n7\tPsycho\t1960\n")


def _inter(rows: list[tuple]) -> str:
    return "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t5\t{t}\n" for u, i, t in rows)


def test_recbole_format_orders_by_time_with_stable_ties(tmp_path):
    # user 1: out of order timestamps with a tie (3 and 4 both at t=20, 3 listed first)
    rows = [("1", "4", 30), ("1", "3", 20), ("1", "4", 20), ("1", "2", 10), ("1", "10", 40), ("1", "5", 50),
            ("1", "6", 60), ("2", "7", 1), ("2", "6", 2), ("2", "5", 3), ("2", "4", 4), ("2", "3", 5)]
    src = _write_recbole(tmp_path / "rb", _inter(rows), _ITEMS)
    out = tmp_path / "out"
    meta = _prepare(out, "prepare.format=recbole", f"prepare.input={src}", "prepare.num_candidates=2")
    titles = load_titles(out)
    # dense ids: items sorted numerically by raw id (2,3,4,5,6,7,10); titles normalised
    assert titles == ["Heat", "Alien", "Brazil", "Fargo", "Memento", "Psycho", "The Usual Suspects"]
    assert meta["n_users"] == 2 and meta["domain"] == "movie" and meta["duplicate_titles"] == 0
    test = {s["user"]: s for s in read_split(out, "test")}
    # user 0 (raw "1"): 2(t10) 3(t20) 4(t20) 4(t30) 10(t40) 5(t50) 6(t60) -> ids 0 1 2 2 6 3 4
    assert test[0]["history"] == [0, 1, 2, 2, 6, 3] and test[0]["target"] == 4


def test_recbole_steam_style_columns_and_explicit_fields(tmp_path):
    rows = [("u1", f"g{i}", i) for i in range(5)] + [("u2", f"g{i}", 10 - i) for i in range(5)]
    inter = "user_id:token\tproduct_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    item = "product_id:token\tapp_name:token_seq\tlabel:token\n" + "".join(
        f"g{i}\tGame {i}\tOther {i}\n" for i in range(5))
    (tmp_path / "rb").mkdir()
    (tmp_path / "rb" / "steam.inter").write_text(inter)
    (tmp_path / "rb" / "steam.item").write_text(item)
    base = ("prepare.format=recbole", f"prepare.input={tmp_path / 'rb'}", "prepare.num_candidates=2",
            "prepare.history_len=2", "prepare.min_history=1")
    meta = _prepare(tmp_path / "a", *base)
    assert meta["domain"] == "game" and load_titles(tmp_path / "a") == [f"Game {i}" for i in range(5)]
    _prepare(tmp_path / "b", *base, "prepare.title_field=label")
    assert load_titles(tmp_path / "b") == [f"Other {i}" for i in range(5)]
    with pytest.raises(DataError, match=r"steam.item: missing item id column \(expected one of sku"):
        _prepare(tmp_path / "c", *base, "prepare.item_field=sku")


def test_prepare_does_not_depend_on_the_hash_seed(tmp_path):
    """String ids pass through sets and dicts: the shards must not change with PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    # numeric ids that differ only in leading zeros ("7", "07", "007") must keep one fixed order
    users = ["7", "07", "007", "1", "2", "3", "4"]
    item_ids = [str(i) for i in range(20)] + ["05", "005", "0"]
    item_ids[0] = "00"
    rows = [(users[u % 7], item_ids[(u * 5 + k) % 23], k + u) for u in range(30) for k in range(6)]
    items = "item_id:token\ttitle:token_seq\n" + "".join(f"{i}\tTitle {i}\n" for i in item_ids)
    src = _write_recbole(tmp_path / "rb", _inter(rows), items)
    fingerprints = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"out{hash_seed}"
        code = ("from llara_dist.config import load_config; from llara_dist.data.prepare import run_prepare; "
                f"run_prepare(load_config(None, ['prepare.format=recbole', 'prepare.input={src}', "
                f"'prepare.out={out}', 'prepare.num_candidates=5']))")
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        fingerprints.append(load_meta(out)["fingerprint"])
    assert fingerprints[0] == fingerprints[1]


def test_grouplens_format(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.item").write_bytes("1|Toy Story (1995)|01-Jan-1995||x|0\n2|Cité des enfants perdus, La (1995)|x\n"
                               "3|Birdcage, The (1996)|x\n4|Heat (1995)|x\n5|Fargo (1996)|x\n".encode("latin-1"))
    (d / "u.data").write_text("".join(f"7\t{i}\t4\t{100 + i}\n" for i in (1, 2, 3, 4))
                              + "".join(f"8\t{i}\t4\t{100 - i}\n" for i in (3, 2, 1, 5)))
    out = tmp_path / "out"
    meta = _prepare(out, "prepare.format=grouplens", f"prepare.input={d}", "prepare.num_candidates=2",
                    "prepare.min_history=1")
    assert load_titles(out) == ["Toy Story", "Cité des enfants perdus, La", "The Birdcage", "Heat", "Fargo"]
    assert meta["counts"] == {"train": 2, "valid": 2, "test": 2}
    test = {s["user"]: s for s in read_split(out, "test")}
    assert test[1]["history"] == [4, 2, 1] and test[1]["target"] == 0  # user 8 by time: 5 3 2 1


@pytest.mark.parametrize("inter, item, message", [
    (None, _ITEMS, "no *.inter file"),
    (_inter([("1", "2", 1)]).replace("timestamp:float", "time:float"), _ITEMS, "missing timestamp column"),
    (_inter([("1", "2", 1)]), _ITEMS.replace("movie_title", "label"), "missing title column"),
    (_inter([("1", "2", 1), ("1", "3", 2)]) + "1\t4\t5\n", _ITEMS, "toy.inter:4: expected 4 tab-separated"),
    (_inter([("1", "2", 1), ("1", "3", "soon")]), _ITEMS, "toy.inter:3: timestamp: expected a number"),
    (_inter([("1", "2", 1), ("1", "99", 2)]), _ITEMS, "toy.inter:3: item '99' has no title"),
    (_inter([("1", "2", 1)]), _ITEMS + "3\tAlien again\t1979\n", "toy.item:9: item '3' is listed twice"),
])
def test_recbole_bad_input_errors(tmp_path, inter, item, message):
    d = tmp_path / "rb"
    d.mkdir()
    if inter is not None:
        (d / "toy.inter").write_text(inter)
    (d / "toy.item").write_text(item)
    with pytest.raises(DataError, match=message.replace("*", r"\*")):
        run_prepare(tiny_config(f"prepare.out={tmp_path / 'out'}", "prepare.format=recbole", f"prepare.input={d}"))


def test_drop_unknown_is_counted(tmp_path, capsys):
    rows = [("1", i, t) for t, i in enumerate(["2", "3", "99", "4", "5", "6"])] + [("2", "7", 1), ("2", "10", 2)]
    src = _write_recbole(tmp_path / "rb", _inter(rows), _ITEMS)
    out = tmp_path / "out"
    meta = _prepare(out, "prepare.format=recbole", f"prepare.input={src}", "prepare.drop_unknown=true",
                    "prepare.num_candidates=2")
    assert meta["filtered"]["unknown_item_interactions"] == 1
    assert "unknown_item_interactions" in capsys.readouterr().out


def test_cli_prepare_and_error_exit_code(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["prepare", "--out", str(out), "--users", "30", "--items", "40", "--num-candidates", "5"]) == 0
    assert load_meta(out)["num_candidates"] == 5
    assert main(["prepare", "--format", "grouplens", "--input", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "u.data: file not found" in capsys.readouterr().err


def test_corrupt_shard_and_out_of_range_item_are_named(tmp_path):
    out = tmp_path / "s"
    meta = _prepare(out, "prepare.users=40", "prepare.items=40", "prepare.num_candidates=5")
    # truncated test shard
    test_tar = out / meta["shards"]["test"][0]["name"]
    data = test_tar.read_bytes()
    test_tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="test-000000.tar: corrupt shard"):
        list(read_split(out, "test"))
    # a well-formed shard (sha recorded) whose sample points past n_items
    sample = {"key": "u0-t5", "user": 0, "history": [1, 2, 3], "target": 40, "candidates": [40, 1, 2, 3, 4]}
    from llara_dist.data.shards import tar_bytes

    bad = tar_bytes([sample])
    test_tar.write_bytes(bad)
    meta["shards"]["test"] = [{"name": test_tar.name, "sha256": hashlib.sha256(bad).hexdigest(), "samples": 1}]
    meta["counts"]["test"] = 1
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"test-000000.tar: sample 'u0-t5': target: item id 40 out of range"):
        list(read_split(out, "test"))
    # a tar that is not a tar at all, with a matching sha: still named
    junk = b"not a tar" * 100
    test_tar.write_bytes(junk)
    meta["shards"]["test"][0]["sha256"] = hashlib.sha256(junk).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="test-000000.tar"):
        list(read_split(out, "test"))


def test_load_meta_errors(tmp_path):
    with pytest.raises(DataError, match="meta.json: not found"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 1}))
    with pytest.raises(DataError, match="missing field 'source'"):
        load_meta(tmp_path)


def test_grouplens_bad_rows_name_file_and_line(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.item").write_bytes(b"1|Toy Story (1995)|x\n2|Heat (1995)|x\n")
    (d / "u.data").write_text("7\t1\t4\t100\n7\t2\t4\n")
    cfg = (f"prepare.out={tmp_path / 'out'}", "prepare.format=grouplens", f"prepare.input={d}")
    with pytest.raises(DataError, match=r"u.data:2: expected 4 tab-separated fields"):
        run_prepare(tiny_config(*cfg))
    (d / "u.data").write_text("7\t1\t4\t100\n7\t3\t4\t101\n")
    with pytest.raises(DataError, match=r"u.data:2: item '3' has no title"):
        run_prepare(tiny_config(*cfg))
    (d / "u.item").unlink()
    with pytest.raises(DataError, match=r"u.item: file not found"):
        run_prepare(tiny_config(*cfg))


ML100K = Path(__import__("os").environ.get("LLARA_ML100K",
                                          Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k"))


@pytest.mark.realdata
@pytest.mark.skipif(not ML100K.is_dir() or not __import__("os").environ.get("LLARA_REALDATA"),
                    reason="set LLARA_REALDATA=1 with ../shared/data/ml-100k present")
def test_movielens_100k_recbole(tmp_path):
    meta = _prepare(tmp_path / "ml", "prepare.format=recbole", f"prepare.input={ML100K}")
    assert (meta["n_users"], meta["n_items"]) == (943, 1682)
    # every interaction but each user's first is a target, kept or dropped for a short history
    assert sum(meta["counts"].values()) + meta["filtered"]["short_history_samples"] == 100_000 - 943
    assert "The Usual Suspects" in load_titles(tmp_path / "ml")
    assert meta["duplicate_titles"] == 23  # e.g. two "Sabrina"s
    assert meta["counts"] == {"train": 95_285, "valid": 943, "test": 943}
    # valid/test: the bytes the per-sample code wrote before the out-of-core rewrite (issue 15); train
    # samples are stored in seeded per-sample key order (pinned by the fingerprint)
    assert [e["sha256"][:16] for e in meta["shards"]["valid"]] == ["a567fcae215ac0d1"]
    assert [e["sha256"][:16] for e in meta["shards"]["test"]] == ["02809a28bdb92da1"]
    assert meta["fingerprint"] == "974f35b08cbf2e88c124bb57430527a62d516d5d6401ca2e2b49339c2f8be3e7"
