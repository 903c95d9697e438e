"""Where a shard directory lives: a local/NFS path or a ``pyarrow.fs`` URI (s3://, gs://, hdfs://, file://).

Every reader of shards (``data.shards``, ``data.stream``) goes through `ShardDir`, so shards on object
storage are read by each rank directly, without a local copy. Only pyarrow's filesystems are used:
they are what Ray Data and Ray Train already use for the same URIs (same credentials, same config).
A ``ShardDir`` can also wrap any ``pyarrow.fs.FileSystem`` object (e.g. ``PyFileSystem`` over an
fsspec filesystem), which is how the tests read shards through a non-local filesystem.

Shards whose name ends in ``.gz`` (``train-000000.tar.gz``) are stored gzip-compressed: their
sha256 covers the stored bytes, and `unpack` turns them back into the tar WebDataset reads.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from llara_dist.errors import DataError


@dataclass(frozen=True)
class ShardDir:
    """A directory on some filesystem: `fs`, the `path` inside it, and the `label` the user wrote."""

    fs: pafs.FileSystem
    path: str
    label: str

    @classmethod
    def of(cls, where: str | Path | ShardDir) -> ShardDir:
        """A local path as is; anything with ``://`` through ``pyarrow.fs.FileSystem.from_uri``."""
        if isinstance(where, ShardDir):
            return where
        text = str(where)
        if "://" not in text:
            return cls(pafs.LocalFileSystem(), str(Path(text).absolute()), text)
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (ValueError, OSError, NotImplementedError, pa.ArrowException) as e:
            raise DataError(f"{text}: not a path or a filesystem URI pyarrow can open ({e})") from None
        return cls(fs, path.rstrip("/"), text.rstrip("/"))

    @classmethod
    def on(cls, fs: pafs.FileSystem, path: str) -> ShardDir:
        """A directory on an explicit pyarrow filesystem (labelled ``<type>://path`` in messages)."""
        return cls(fs, path.rstrip("/"), f"{fs.type_name}://{path.rstrip('/')}")

    def where(self, name: str) -> str:
        """How a file of this directory is named in messages."""
        if isinstance(self.fs, pafs.LocalFileSystem) and "://" not in self.label:
            return str(Path(self.label) / name)
        return f"{self.label}/{name}"

    def is_file(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def file_sizes(self) -> dict[str, int]:
        """Size of every file directly in the directory, from one listing (one request on S3/GCS)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{self.label}: cannot list the directory ({e})") from None
        return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, name: str) -> bytes:
        """A file's stored bytes (no transparent decompression: hashes cover what is stored)."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}", compression=None) as f:
                return f.read()
        except FileNotFoundError:
            raise DataError(f"{self.where(name)}: not found") from None
        except (OSError, pa.ArrowException) as e:
            if not self.is_file(name):
                raise DataError(f"{self.where(name)}: not found") from None
            raise DataError(f"{self.where(name)}: cannot be read ({e})") from None


def unpack(name: str, stored: bytes, where: str) -> bytes:
    """A shard's tar bytes: gunzipped when its name ends in ``.gz``, else as stored."""
    if not name.endswith(".gz"):
        return stored
    try:
        return gzip.decompress(stored)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}: corrupt shard: not a readable gzip file ({e})") from None
