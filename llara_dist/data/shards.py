"""The on-disk shard contract: write it deterministically, read and validate it.

A shard directory holds ``meta.json``, ``items.jsonl`` and WebDataset tars ``{split}-NNNNNN.tar``
with one ``<key>.json`` member per sample (see docs/data.md). Tars are written byte-for-byte
reproducibly (fixed member order, mtime 0, no owner names), so the same input and seed give the
same sha256s, which ``meta.json`` records and every reader checks: a corrupt, truncated or edited
shard is reported by name instead of being half-read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from webdataset.tariterators import group_by_keys, tar_file_expander

from llara_dist.data.samples import SPLITS, train_candidates  # noqa: F401  (train_candidates re-exported)
from llara_dist.data.storage import ShardDir, unpack
from llara_dist.errors import DataError

SCHEMA_VERSION = 1
DOMAINS = ("movie", "game", "artist")
_META_FIELDS = {
    "schema_version": int, "source": str, "domain": str, "n_items": int, "n_users": int,
    "history_len": int, "min_history": int, "num_candidates": int, "seed": int, "counts": dict,
    "shards": dict, "filtered": dict, "fingerprint": str,
}


COMPRESSIONS = {"none": ".tar", "gzip": ".tar.gz"}


def shard_name(split: str, index: int, compression: str = "none") -> str:
    """``train-000003.tar``, or ``train-000003.tar.gz`` with gzip (WebDataset decompresses ``.gz``)."""
    return f"{split}-{index:06d}{COMPRESSIONS[compression]}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing


def encode_sample(sample: dict) -> bytes:
    # Fixed field order and separators: the bytes (and so the shard hashes) depend only on the data.
    return json.dumps(sample, separators=(",", ":"), ensure_ascii=False).encode()


# A lean USTAR writer: the bytes `tarfile` writes for a regular file with mode 0644, uid/gid 0,
# mtime 0 and no owner names (a test checks the equality), without building a TarInfo per member.
# WebDataset stores one member per sample, so the header is most of the work of writing a shard.
_BLOCK, _RECORD = 512, 10240
_HEAD = (b"\0" * 100 + b"0000644\0" + b"0000000\0" + b"0000000\0")  # name, mode, uid, gid
_MID = b"00000000000\0"  # mtime
_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 64 + b"\0" * 16 + b"\0" * 155
         + b"\0" * 12)  # typeflag, linkname, magic+version, uname, gname, devmajor+devminor (empty for files), prefix, pad
_CONST_SUM = sum(_HEAD) + sum(_MID) + sum(_TAIL) + 8 * 32  # the checksum field counts as 8 spaces


def tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """One tar holding ``(name, data)`` members in order, byte-identical to `tarfile` (USTAR)."""
    parts: list[bytes] = []
    offset = 0
    for name, data in members:
        raw = name.encode()
        if len(raw) >= 100:
            raise ValueError(f"tar member name too long for the lean writer: {name!r}")
        size = b"%011o\0" % len(data)
        chksum = _CONST_SUM + sum(raw) + sum(size)
        parts.append(raw + _HEAD[len(raw):124] + size + _MID + b"%06o\0 " % chksum + _TAIL)
        parts.append(data)
        pad = -len(data) % _BLOCK
        if pad:
            parts.append(b"\0" * pad)
        offset += _BLOCK + len(data) + pad
    end = offset + 2 * _BLOCK
    parts.append(b"\0" * (2 * _BLOCK + (-end % _RECORD)))
    return b"".join(parts)


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """(n, digits) uint8 ASCII of `values` in zero-padded octal (``%0{digits}o``), most significant first."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return (((values[:, None] >> shifts) & 7) + ord("0")).astype(np.uint8)


def _binary(data: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """An Arrow binary array over `data` (no copy) whose items are `lengths` bytes each, in order."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(lengths),
                                            [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _zeros(lengths: np.ndarray) -> pa.Array:
    return _binary(np.zeros(int(lengths.sum()), np.uint8), lengths)


# what follows the name in a header (mode .. prefix), with the checksum field as its 8 spaces
_AFTER_NAME = np.frombuffer(_HEAD[100:] + b"\0" * 12 + _MID + b" " * 8 + _TAIL, np.uint8)


def tar_columns(names: pa.Array, bodies: pa.Array) -> bytes:
    """`tar_members` of ``zip(names, bodies)`` given as Arrow string arrays: the same bytes, no Python loop.

    A member is its header block (name, NUL padding to 100 bytes, then mode .. prefix) and its body
    NUL-padded to whole blocks. The per-member part of the header after the name (size in octal and
    the checksum) is built as an (n, 412) array; one Arrow kernel then concatenates the five pieces
    of every member, which lays out the whole archive in a single pass.
    """
    names = names.cast(pa.large_binary())
    bodies = bodies.cast(pa.large_binary())
    n = len(names)
    name_len = pc.binary_length(names).to_numpy(zero_copy_only=False).astype(np.int64)
    body_len = pc.binary_length(bodies).to_numpy(zero_copy_only=False).astype(np.int64)
    if n and name_len.max() >= 100:
        raise ValueError(f"tar member name too long for the lean writer: {names[int(name_len.argmax())].as_py()!r}")
    rest = np.broadcast_to(_AFTER_NAME, (n, _BLOCK - 100)).copy()
    size = _octal(body_len, 11)
    rest[:, 24:35] = size  # size: 11 octal digits + NUL (the NUL is in the template)
    # the checksum sums the header with its own field as 8 spaces: the constant part, the name and
    # the size digits (the name's byte sums come from a running sum over all names' bytes)
    _, name_off, name_data = names.buffers()
    name_bytes = np.frombuffer(name_data, np.uint8) if name_data is not None else np.zeros(0, np.uint8)
    running = np.concatenate(([0], np.cumsum(name_bytes, dtype=np.int64)))
    name_off = np.frombuffer(name_off, np.int64, count=n + 1, offset=names.offset * 8)
    chksum = _CONST_SUM + (running[name_off[1:]] - running[name_off[:-1]]) + size.sum(axis=1, dtype=np.int64)
    rest[:, 48:54] = _octal(chksum, 6)  # "%06o\0 "
    rest[:, 54:56] = (0, ord(" "))
    members = pc.binary_join_element_wise(names, _zeros(100 - name_len), _binary(rest.reshape(-1), np.full(n, 412)),
                                          bodies, _zeros(-body_len % _BLOCK), pa.scalar(b"", pa.large_binary()))
    # the kernel's output buffer may be over-allocated: the archive is the span its offsets cover
    off = np.frombuffer(members.buffers()[1], np.int64, count=n + 1, offset=members.offset * 8)
    archive = memoryview(members.buffers()[2])[off[0]:off[-1]] if n else b""
    end = len(archive) + 2 * _BLOCK
    return b"".join([archive, bytes(2 * _BLOCK + (-end % _RECORD))])


def tar_bytes(samples: list[dict]) -> bytes:
    """One deterministic tar with a ``<key>.json`` member per sample, in the given order."""
    return tar_members([(f"{sample['key']}.json", encode_sample(sample)) for sample in samples])


def compress_shard(data: bytes, compression: str) -> bytes:
    """The file bytes of a shard: the tar itself, or gzip with no name and mtime 0 (reproducible)."""
    if compression == "none":
        return data
    if compression == "gzip":
        # level 6 (zlib's default): most of level 9's size at a fraction of its time on JSON text
        return gzip.compress(data, compresslevel=6, mtime=0)
    raise DataError(f"prepare.compression: expected one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def write_split(out_dir: Path, split: str, samples: list[dict], samples_per_shard: int,
                progress: Callable[[int], object] | None = None) -> list[dict]:
    """Write a split's samples as tars of `samples_per_shard`; returns their meta entries.

    `progress(n)` is called after each shard with its sample count (e.g. a tqdm bar's `update`).
    """
    entries = []
    for index, start in enumerate(range(0, len(samples), samples_per_shard)):
        chunk = samples[start:start + samples_per_shard]
        data = tar_bytes(chunk)
        name = shard_name(split, index)
        (out_dir / name).write_bytes(data)
        entries.append({"name": name, "sha256": sha256_bytes(data), "samples": len(chunk)})
        if progress is not None:
            progress(len(chunk))
    return entries


# ----------------------------------------------------------------------------------------------
# Metadata and titles (read through `ShardDir`: a local/NFS path or a pyarrow.fs URI)


def load_meta(shard_dir: str | Path | ShardDir) -> dict:
    """``meta.json``, validated; `DataError` naming the file and field otherwise."""
    loc = ShardDir.of(shard_dir)
    path = loc.where("meta.json")
    if not loc.is_file("meta.json"):
        raise DataError(f"{path}: not found (is {loc.label} a directory written by `llara-dist prepare`?)")
    try:
        meta = json.loads(loc.read("meta.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    for name, typ in _META_FIELDS.items():
        if name not in meta:
            raise DataError(f"{path}: missing field {name!r}")
        if not isinstance(meta[name], typ) or (typ is int and isinstance(meta[name], bool)):
            raise DataError(f"{path}: {name}: expected {typ.__name__}, got {meta[name]!r}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise DataError(f"{path}: schema_version: expected {SCHEMA_VERSION}, got {meta['schema_version']} "
                        "(re-run `llara-dist prepare`)")
    if meta["domain"] not in DOMAINS:
        raise DataError(f"{path}: domain: expected one of {', '.join(DOMAINS)}, got {meta['domain']!r}")
    if meta["n_items"] < 2:
        raise DataError(f"{path}: n_items: expected at least 2, got {meta['n_items']}")
    for split in SPLITS:
        entries = meta["shards"].get(split)
        if not isinstance(entries, list):
            raise DataError(f"{path}: shards.{split}: expected a list of shard entries")
        for i, e in enumerate(entries):
            if not (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("sha256"), str)
                    and isinstance(e.get("samples"), int)):
                raise DataError(f"{path}: shards.{split}[{i}]: expected {{name, sha256, samples}}, got {e!r}")
        total = sum(e["samples"] for e in entries)
        if meta["counts"].get(split) != total:
            raise DataError(f"{path}: counts.{split}: {meta['counts'].get(split)!r} disagrees with the "
                            f"shard entries ({total} samples)")
    return meta


def load_titles(shard_dir: str | Path | ShardDir) -> list[str]:
    """Item titles from ``items.jsonl`` (index = item id), checked against ``meta.json``."""
    loc = ShardDir.of(shard_dir)
    meta = load_meta(loc)
    path = loc.where("items.jsonl")
    if not loc.is_file("items.jsonl"):
        raise DataError(f"{path}: not found")
    titles = []
    for n, line in enumerate(loc.read("items.jsonl").decode("utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or row.get("id") != len(titles) or not isinstance(row.get("title"), str):
            raise DataError(f"{path}:{n}: expected {{\"id\": {len(titles)}, \"title\": str}} (ids dense from 0), "
                            f"got {line[:80]!r}")
        titles.append(row["title"])
    if len(titles) != meta["n_items"]:
        raise DataError(f"{path}: {len(titles)} items, but meta.json says n_items={meta['n_items']}")
    return titles


# ----------------------------------------------------------------------------------------------
# Reading


def fetch_shard(shard_dir: str | Path | ShardDir, entry: dict) -> tuple[bytes, int]:
    """(tar bytes, bytes read from storage) of a shard, checked against the sha256 recorded at prepare.

    The hash covers the stored bytes, so a ``.tar.gz`` shard is checked before it is gunzipped.
    """
    loc = ShardDir.of(shard_dir)
    name = entry["name"]
    try:
        stored = loc.read(name)
    except DataError as e:
        if "not found" in str(e):
            raise DataError(f"{loc.where(name)}: shard listed in meta.json is missing") from None
        raise
    if sha256_bytes(stored) != entry["sha256"]:
        raise DataError(f"{loc.where(name)}: corrupt shard: sha256 does not match meta.json (the file is "
                        "truncated, damaged or was modified after prepare; re-run `llara-dist prepare`)")
    return unpack(name, stored, loc.where(name)), len(stored)


def read_shard_bytes(shard_dir: str | Path | ShardDir, entry: dict) -> bytes:
    """A shard's tar bytes (gunzipped if stored as ``.tar.gz``), checked against its sha256."""
    return fetch_shard(shard_dir, entry)[0]


def check_shards(shard_dir: str | Path | ShardDir, split: str, *, skip_corrupt: bool = False,
                 hashes: bool | None = None) -> tuple[list[dict], list[str]]:
    """(usable shard entries, names of skipped shards) of a split.

    Two depths. The quick check (the default without `skip_corrupt`) lists the directory once:
    every shard exists and is not empty, and a plain ``.tar`` is a whole number of 512-byte
    blocks (a truncated copy rarely is). It costs one listing, not a read, so a run over terabytes
    of shards starts (and resumes) in seconds; the sha256 of each shard is then checked by the
    reader that reads it (`fetch_shard`), naming the shard. With `hashes` (implied by
    `skip_corrupt`) every shard's sha256 is checked now: skipping needs every rank to agree on
    which shards are bad before any of them reads, so it costs one full read.

    A damaged shard raises `DataError` naming it, or with `skip_corrupt` is skipped with a warning.
    """
    loc = ShardDir.of(shard_dir)
    meta = load_meta(loc)
    full = skip_corrupt if hashes is None else hashes
    sizes = {} if full else loc.file_sizes()
    good, skipped = [], []
    for entry in meta["shards"][split]:
        try:
            if full:
                fetch_shard(loc, entry)
            else:
                _quick_check(loc, entry, sizes.get(entry["name"]))
        except DataError as e:
            if not skip_corrupt:
                raise DataError(f"{e} (set data.skip_corrupt=true to skip damaged shards)") from None
            warnings.warn(f"skipping {e}", stacklevel=2)
            skipped.append(entry["name"])
            continue
        good.append(entry)
    return good, skipped


def _quick_check(loc: ShardDir, entry: dict, size: int | None) -> None:
    where = loc.where(entry["name"])
    if size is None:
        raise DataError(f"{where}: shard listed in meta.json is missing")
    if size == 0 or (entry["name"].endswith(".tar") and size % 512):
        raise DataError(f"{where}: corrupt shard: {size} bytes is not a whole tar (truncated?); "
                        "re-run `llara-dist prepare`")


def shard_records(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """(key, json bytes) of each sample in a tar, via WebDataset's own tar reader."""
    stream = tar_file_expander([{"url": name, "stream": io.BytesIO(data)}], eof_value=None)
    try:
        for sample in group_by_keys(stream):
            if "json" not in sample:
                raise DataError(f"{name}: sample {sample['__key__']!r} has no .json member")
            yield sample["__key__"], sample["json"]
    except (tarfile.TarError, ValueError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{name}: corrupt shard: not a readable tar ({e})") from None


def decode_sample(raw: bytes, *, shard: str, n_items: int, with_candidates: bool) -> dict:
    """Parse one sample's JSON and check every field, including item ids < n_items."""
    try:
        sample = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{shard}: a sample is not valid JSON ({e})") from None
    key = sample.get("key") if isinstance(sample, dict) else None
    where = f"{shard}: sample {key!r}"
    if not isinstance(key, str) or not isinstance(sample.get("user"), int):
        raise DataError(f"{where}: expected fields key (str) and user (int)")
    fields = ["target", "history"] + (["candidates"] if with_candidates else [])
    for name in fields:
        value = sample.get(name)
        ids = value if isinstance(value, list) else [value]
        if name != "target" and not isinstance(value, list):
            raise DataError(f"{where}: {name}: expected a list of item ids, got {value!r}")
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_items:
                raise DataError(f"{where}: {name}: item id {i!r} out of range (expected 0 <= id < "
                                f"n_items={n_items}); the shards do not match their meta.json")
    if with_candidates and sample["candidates"].count(sample["target"]) != 1:
        raise DataError(f"{where}: candidates must contain the target exactly once")
    return sample


def read_split(shard_dir: str | Path | ShardDir, split: str) -> Iterator[dict]:
    """Every sample of a split, in stored order (valid/test carry their fixed candidates)."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    loc = ShardDir.of(shard_dir)
    meta = load_meta(loc)
    for entry in meta["shards"][split]:
        data = read_shard_bytes(loc, entry)
        for _, raw in shard_records(entry["name"], data):
            yield decode_sample(raw, shard=entry["name"], n_items=meta["n_items"], with_candidates=split != "train")


def read_split_part(shard_dir: str | Path | ShardDir, split: str, rank: int, world_size: int) -> Iterator[dict]:
    """A disjoint strided part of a split (sample index ``i % world_size == rank``), for evaluation."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    for i, sample in enumerate(read_split(shard_dir, split)):
        if i % world_size == rank:
            yield sample
