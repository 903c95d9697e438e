"""Raw interaction logs -> users' item sequences with dense item ids and titles.

The sources of `llara-dist prepare`:

- ``recbole``: RecBole atomic files (``*.inter`` with user/item/timestamp columns, ``*.item`` with an
  id and a title column, typed headers such as ``item_id:token``).
- ``grouplens``: the raw MovieLens-100K download (``u.data``, ``u.item``; latin-1, ``Title (Year)``).
- ``parquet`` / ``csv``: one row per interaction, columns mapped by ``prepare.*_field``.
- ``synthetic``: a generated data set with learnable sequential structure (see `generate_synthetic`).

A file source is read in Arrow batches and spilled to disk partitioned by user (`SpilledLog`), so
its size is bounded by the disk, not the memory; the synthetic set is small and held in memory
(`Interactions`). Both yield the users' sequences a chunk at a time (`chunks()`).

Item ids are dense ``0..n_items-1``: the items that occur in the kept interactions, sorted by their
raw id (numerically when every raw id is an integer, else as strings). Users are numbered the same
way. Every problem with the input raises `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import bisect
import csv as pycsv
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from llara_dist.data.samples import UserChunk
from llara_dist.data.spill import Spill
from llara_dist.errors import DataError


@dataclass
class Interactions:
    """A data set held in memory, columnar: every user's items in time order, end to end.

    ``items[offsets[u]:offsets[u + 1]]`` is user u's sequence (oldest first): two flat integer
    arrays instead of a list per user. (File sources are `SpilledLog`s, never held whole.)
    """

    source: str
    domain: str
    titles: list[str]  # index = dense item id
    items: np.ndarray  # int32, grouped by dense user id, time order inside a user
    offsets: np.ndarray  # int64, n_users + 1 entries
    filtered: dict[str, int] = field(default_factory=dict)  # what was dropped, and why

    @classmethod
    def from_sequences(cls, source: str, domain: str, titles: list[str], sequences: list[list[int]],
                       filtered: dict[str, int] | None = None) -> "Interactions":
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.fromiter((i for s in sequences for i in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(source, domain, titles, items, offsets, dict(filtered or {}))

    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    def pieces(self) -> Iterator[UserChunk]:
        return self.chunks()

    @staticmethod
    def piece_chunk(chunk: UserChunk) -> UserChunk:
        return chunk

    def chunks(self, rows: int = 1 << 18) -> Iterator[UserChunk]:
        """Runs of consecutive users of about `rows` interactions each (the shape `prepare` consumes)."""
        a = 0
        while a < self.n_users:
            b = max(a + 1, int(np.searchsorted(self.offsets, self.offsets[a] + rows, side="right")) - 1)
            b = min(b, self.n_users)
            o = self.offsets[a:b + 1]
            yield UserChunk(np.arange(a, b), o - o[0], self.items[o[0]:o[-1]])
            a = b

    @property
    def sequences(self) -> list[list[int]]:
        """Per-user lists (small data sets and tests only: this is the memory the arrays save)."""
        return [self.items[a:b].tolist() for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]


# ----------------------------------------------------------------------------------------------
# Title normalisation (as the LLaRA code does for MovieLens)

_YEAR_SUFFIX = re.compile(r"\s*\(\s*\d{4}\s*\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.*), (?P<article>The|A|An)$")


def normalize_title(raw: str) -> str:
    """``"Usual Suspects, The (1995)"`` -> ``"The Usual Suspects"``.

    Removes a ``(YYYY)`` year suffix and moves a trailing ", The" / ", A" / ", An" to the front;
    collapses runs of whitespace.
    """
    title = " ".join(raw.split())
    title = _YEAR_SUFFIX.sub("", title)
    m = _TRAILING_ARTICLE.match(title)
    if m:
        title = f"{m['article']} {m['body']}"
    return title.strip()


# ----------------------------------------------------------------------------------------------
# Columnar building: raw id columns -> dense ids -> time-ordered per-user arrays (Arrow + NumPy)


def _sorted_raw_ids(raw_ids) -> list[str]:
    ids = list(raw_ids)
    if all(re.fullmatch(r"-?\d+", i) for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))  # "007" and "7" stay distinct, in a fixed order
    return sorted(ids)


class _Ids:
    """Raw id -> provisional code in first-seen order, fed batch by batch: Arrow hashes each batch's
    rows, Python only sees the batch's distinct ids (users and items are few next to rows)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def encode(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        enc = pc.dictionary_encode(column)
        index = self.index
        lookup = np.fromiter((index.setdefault(r, len(index)) for r in enc.dictionary.to_pylist()),
                             dtype=np.int32, count=len(enc.dictionary))
        return lookup[enc.indices.to_numpy(zero_copy_only=False)]

    @property
    def raw(self) -> list[str]:
        return list(self.index)


_ROW = np.dtype([("user", "<i4"), ("item", "<i4"), ("time", "<f8")])
_PARTITION_ROWS = 1 << 18  # rows per on-disk partition of the log: one is sorted in memory at a time
_TEXT_ROW_BYTES = 16  # a lower bound of a text log's bytes per row, to estimate rows from the size


def partitions_for(rows: int) -> int:
    """How many on-disk partitions a log of about `rows` rows is split into: enough that one
    partition (sorted and turned into samples in memory) stays small whatever the log's size. The
    output does not depend on it."""
    return max(1, min(4096, -(-rows // _PARTITION_ROWS)))


def _text_rows(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths) // _TEXT_ROW_BYTES


def _tabular_rows(paths: list[Path], fmt: str) -> int:
    if fmt != "parquet":
        return _text_rows(paths)
    rows = 0
    for p in paths:
        try:
            rows += pq.ParquetFile(p).metadata.num_rows  # exact, from the footer
        except (OSError, pa.ArrowException):
            pass  # reported by the reader, with the file's name
    return rows


class _Log:
    """The interaction columns, fed batch by batch and spilled to disk partitioned by user.

    Rows go to ``user code % partitions`` as compact (user code, item code, time) records, so one
    partition holds every row of its users, in input order. Memory is the id dictionaries and a
    few per-item counters, never a per-row array.
    """

    def __init__(self, tmp: Path, partitions: int, expected_rows: int | None = None) -> None:
        self.users, self.items = _Ids(), _Ids()
        self.spill = Spill(tmp, "log", _ROW, partitions)
        self.rows = 0
        # progress of the read (minutes for a log of a billion rows); the total is an estimate for text
        self.bar = tqdm(total=expected_rows, desc="reading the log", unit="row", unit_scale=True, leave=False,
                        disable=None)  # None: only on a terminal (an error stays one line in logs)
        self.item_count = np.zeros(0, dtype=np.int64)
        self.item_first_row = np.zeros(0, dtype=np.int64)  # each item's first row (input order)

    def add(self, users: pa.Array, items: pa.Array, times: np.ndarray) -> np.ndarray:
        """Append a batch; returns its item codes (for first-row titles)."""
        seen = len(self.items.index)
        item_codes = self.items.encode(items)
        user_codes = self.users.encode(users)
        n_items = len(self.items.index)
        if n_items > seen:
            first = np.full(n_items - seen, -1, dtype=np.int64)
            new = np.flatnonzero(item_codes >= seen)
            codes, at = np.unique(item_codes[new], return_index=True)
            first[codes - seen] = new[at] + self.rows
            self.item_first_row = np.concatenate([self.item_first_row, first])
            self.item_count = np.concatenate([self.item_count, np.zeros(n_items - seen, dtype=np.int64)])
        self.item_count += np.bincount(item_codes, minlength=n_items)
        rec = np.empty(len(times), dtype=_ROW)
        rec["user"], rec["item"], rec["time"] = user_codes, item_codes, times
        self.spill.append(user_codes % self.spill.buckets, rec)
        self.rows += len(times)
        self.bar.update(len(times))
        return item_codes


def _dense(present: np.ndarray, raw: list[str]) -> tuple[np.ndarray, list[str]]:
    """Code -> dense id over the `present` codes, in `_sorted_raw_ids` order (-1 where absent)."""
    codes = np.flatnonzero(present)
    ordered = _sorted_raw_ids(raw[c] for c in codes.tolist())
    rank = {r: i for i, r in enumerate(ordered)}
    remap = np.full(len(raw), -1, dtype=np.int32)
    remap[codes] = [rank[raw[c]] for c in codes.tolist()]
    return remap, ordered


@dataclass
class SpilledLog:
    """A read log, still on disk: partitions of (user code, item code, time) rows plus the maps from
    codes to dense ids. `chunks()` sorts one partition at a time into users' sequences."""

    source: str
    domain: str
    titles: list[str]  # index = dense item id
    spill: Spill
    user_remap: np.ndarray  # user code -> dense id (-1: every row of the user was dropped)
    item_remap: np.ndarray  # item code -> dense id (-1: no title, dropped)
    n_users: int
    n_interactions: int  # rows read, dropped ones included
    filtered: dict[str, int] = field(default_factory=dict)

    def pieces(self) -> Iterator[np.ndarray]:
        """The partitions' raw rows, one at a time (what a Ray task turns into a chunk)."""
        for b in range(self.spill.buckets):
            yield self.spill.read(b)

    def piece_chunk(self, rows: np.ndarray) -> UserChunk:
        """One partition's rows -> its users' time-ordered sequences (dropped rows removed)."""
        items = self.item_remap[rows["item"]]
        keep = items >= 0
        if not keep.all():
            rows, items = rows[keep], items[keep]
        users = self.user_remap[rows["user"]]
        order = np.lexsort((rows["time"], users))  # by user, then time; stable: ties keep input order
        return UserChunk.from_sorted(users[order], items[order])

    def chunks(self) -> Iterator[UserChunk]:
        return (self.piece_chunk(rows) for rows in self.pieces())


def unknown_item_error(where: str, item: str, missing_title: str) -> DataError:
    """The error for the first row of an item without a title (both engines raise this one)."""
    return DataError(f"{where}: item {item!r} has no title in {missing_title} "
                     "(pass --drop-unknown to drop such interactions)")


def build_interactions(source: str, domain: str, log: _Log, titles_by_raw: dict[str, str], *,
                       drop_unknown: bool, where: Callable[[int], str], missing_title: str,
                       file: Path | str) -> SpilledLog:
    """The read log -> dense ids: items and users numbered over the kept rows, in raw-id order.

    Items without a title are an error naming ``where(row)`` of the first such row unless
    `drop_unknown`. Each user's events are sorted by time with ties in input order when the
    partitions are read (`SpilledLog.chunks`), so the result depends only on the rows.
    """
    log.bar.close()
    user_raw, item_raw = log.users.raw, log.items.raw
    known = np.fromiter((r in titles_by_raw for r in item_raw), dtype=bool, count=len(item_raw))
    dropped = int(log.item_count[~known].sum())
    if dropped and not drop_unknown:
        code = int(np.argmin(np.where(known, np.iinfo(np.int64).max, log.item_first_row)))
        raise unknown_item_error(where(int(log.item_first_row[code])), item_raw[code], missing_title)
    if log.rows == dropped:
        raise DataError(f"{file}: no interactions")
    item_remap, item_order = _dense(known & (log.item_count > 0), item_raw)
    users_kept = np.ones(len(user_raw), dtype=bool)
    if dropped:  # a user whose every row was dropped is no user: one pass over the partitions
        users_kept[:] = False
        for b in range(log.spill.buckets):
            rows = log.spill.read(b)
            users_kept[rows["user"][known[rows["item"]]]] = True
    user_remap, user_order = _dense(users_kept, user_raw)
    titles = [titles_by_raw[r] for r in item_order]
    return SpilledLog(source=source, domain=domain, titles=titles, spill=log.spill, user_remap=user_remap,
                      item_remap=item_remap, n_users=len(user_order), n_interactions=log.rows,
                      filtered={"unknown_item_interactions": dropped})


def _numbers(column: pa.ChunkedArray | pa.Array, where: Callable[[int], str], field: str) -> np.ndarray:
    """A timestamp column as float64 seconds: numbers, Parquet timestamps/dates, or ISO-8601 strings
    (``2021-03-04``, ``2021-03-04T05:06:07.5``, with ``Z`` or an offset); the first value that is none
    of these is named by row."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return _seconds(column)
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{where(row)}: {field}: expected a number, got an empty value")
    try:
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        for unit in (pa.timestamp("us"), pa.timestamp("us", tz="UTC")):  # without, then with a zone
            try:
                return _seconds(pc.cast(column, unit))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
    values = column.to_pylist()  # error path (or odd spellings Arrow refuses): Python decides
    out = np.empty(len(values), dtype=np.float64)
    for row, v in enumerate(values):
        try:
            out[row] = float(v)
            continue
        except (TypeError, ValueError):
            pass
        try:
            t = datetime.fromisoformat(str(v))
            out[row] = (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
        except ValueError:
            raise DataError(f"{where(row)}: {field}: expected a number or an ISO-8601 date/time, "
                            f"got {v!r}") from None
    return out


def _seconds(column: pa.Array) -> np.ndarray:
    # microseconds first: a cast straight to seconds refuses sub-second values ("would lose data")
    us = pc.cast(pc.cast(column, pa.timestamp("us", tz=getattr(column.type, "tz", None))), pa.int64())
    return us.to_numpy(zero_copy_only=False).astype(np.float64) / 1e6


def _text_lines(path: Path, encoding: str) -> Iterator[str]:
    with open(path, encoding=encoding, newline="") as f:
        for line in f:
            yield line.rstrip("\n").rstrip("\r")


def _line_of_row(path: Path, row: int, header_lines: int, encoding: str) -> int:
    """1-based file line of data row `row` (0-based), skipping blank lines as the reader does."""
    seen = -1
    for n, line in enumerate(_text_lines(path, encoding), start=1):
        if n <= header_lines or not line:
            continue
        seen += 1
        if seen == row:
            return n
    return n  # pragma: no cover  (row beyond the file: cannot happen for a row Arrow read)


# Arrow's streaming CSV reader reads up to 32 blocks ahead in the background: 2 MB blocks bound that
# buffer at 64 MB whatever the file size (16 MB blocks buffered ~0.5 GB of a large log).
_BATCH_BYTES = 1 << 21


def _delimited_batches(path: Path, names: list[str], columns: list[str], *, header_lines: int, encoding: str,
                       describe: str) -> Iterator[pa.RecordBatch]:
    """Tab-separated text as Arrow record batches (streaming): no quoting, every column a string.

    A row with the wrong number of fields is reported with its exact line (found by a Python scan,
    on the error path only).
    """
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=header_lines, encoding=encoding,
                                           block_size=_BATCH_BYTES),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                 include_columns=columns, strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False))
        yield from reader
    except pa.ArrowInvalid as e:
        for n, line in enumerate(_text_lines(path, encoding), start=1):
            if n > header_lines and line and len(line.split("\t")) != len(names):
                raise DataError(f"{path}:{n}: expected {len(names)} tab-separated fields "
                                f"({describe}), got {len(line.split(chr(9)))}") from None
        raise DataError(f"{path}: not readable as tab-separated text ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} ({e})") from None


def _read_text_log(log: _Log, path: Path, names: list[str], cols: tuple[str, str, str], *, header_lines: int,
                   encoding: str, describe: str, strip: bool = False) -> Callable[[int], str]:
    """(user, item, time) columns of a tab-separated log, batch by batch; and `where(row)` -> file:line."""

    def where(row: int) -> str:
        return f"{path}:{_line_of_row(path, row, header_lines, encoding)}"

    for batch in _delimited_batches(path, names, list(cols), header_lines=header_lines, encoding=encoding,
                                    describe=describe):
        u, i, t = (batch.column(c) for c in cols)
        if strip:
            u, i = pc.utf8_trim_whitespace(u), pc.utf8_trim_whitespace(i)
        base = log.rows
        log.add(u, i, _numbers(t, lambda r, base=base: where(base + r), "timestamp"))
    return where


# ----------------------------------------------------------------------------------------------
# RecBole atomic files

# RecBole's names for the item id (MovieLens/Amazon, Steam, LastFM, Yelp, ...) and the title.
_ITEM_FIELDS = ("item_id", "product_id", "artist_id", "track_id", "business_id", "book_id", "anime_id")
_TITLE_FIELDS = ("movie_title", "title", "app_name", "artist_name", "name", "item_name", "book_title")


def _one_file(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if not found:
        raise DataError(f"{directory}: no {pattern} file found (expected RecBole atomic files)")
    if len(found) > 1:
        raise DataError(f"{directory}: several {pattern} files ({', '.join(f.name for f in found)}); "
                        "expected exactly one")
    return found[0]


def _read_atomic(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header field names (without `:type`) and (line number, fields) rows."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    lines = text.split("\n")
    if not lines or not lines[0].strip():
        raise DataError(f"{path}:1: missing header line (expected e.g. 'user_id:token<TAB>item_id:token')")
    header = [h.split(":", 1)[0].strip() for h in lines[0].rstrip("\r").split("\t")]
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(f"{path}:{n}: expected {len(header)} tab-separated fields "
                            f"({', '.join(header)}), got {len(fields)}")
        rows.append((n, fields))
    return header, rows


def _column(header: list[str], names: tuple[str, ...], path: Path, what: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DataError(f"{path}: missing {what} column (expected one of {', '.join(names)}; "
                    f"header has {', '.join(header)})")


def _guess_domain(name: str) -> str:
    name = name.lower()
    if "steam" in name or "game" in name:
        return "game"
    if "lastfm" in name or "music" in name or "artist" in name:
        return "artist"
    return "movie"


def load_recbole(directory: str | Path, tmp: Path, *, drop_unknown: bool = False, item_field: str | None = None,
                 title_field: str | None = None, user_field: str | None = None,
                 time_field: str | None = None) -> SpilledLog:
    """Read ``*.inter`` and ``*.item`` (spilling the log under `tmp`); the ``*_field`` arguments
    override the detected columns."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: input directory not found")
    inter_file, item_file = _one_file(directory, "*.inter"), _one_file(directory, "*.item")

    # The item file is one row per item: small, read line by line to name duplicates exactly.
    header, rows = _read_atomic(item_file)
    item_names = (item_field,) if item_field else _ITEM_FIELDS
    id_col = _column(header, item_names, item_file, "item id")
    item_field = header[id_col]  # the .inter file must use the same name
    title_col = _column(header, (title_field,) if title_field else _TITLE_FIELDS, item_file, "title")
    titles_by_raw, first_line = {}, {}
    for n, fields in rows:
        raw = fields[id_col]
        if raw in first_line:
            raise DataError(f"{item_file}:{n}: item {raw!r} is listed twice (first on line {first_line[raw]})")
        first_line[raw] = n
        title = normalize_title(fields[title_col])
        if title:  # an empty title counts as "no title"
            titles_by_raw[raw] = title

    # The interaction file is the big one: Arrow reads it, columns only.
    with open(inter_file, encoding="utf-8", newline="") as f:
        first = f.readline().rstrip("\n").rstrip("\r")
    if not first.strip():
        raise DataError(f"{inter_file}:1: missing header line (expected e.g. 'user_id:token<TAB>item_id:token')")
    raw_names = first.split("\t")
    header = [h.split(":", 1)[0].strip() for h in raw_names]
    names = [f"{i}:{h}" for i, h in enumerate(header)]  # unique even if a header repeats a name
    u_col = names[_column(header, (user_field or "user_id",), inter_file, "user id")]
    i_col = names[_column(header, (item_field,), inter_file, "item id")]
    t_col = names[_column(header, (time_field or "timestamp",), inter_file, "timestamp")]
    rows = _text_rows([inter_file])
    log = _Log(tmp, partitions_for(rows), rows)
    where = _read_text_log(log, inter_file, names, (u_col, i_col, t_col), header_lines=1, encoding="utf-8",
                           describe=", ".join(header))
    return build_interactions("recbole:" + inter_file.stem, _guess_domain(inter_file.stem), log, titles_by_raw,
                              drop_unknown=drop_unknown, where=where, missing_title="the item file",
                              file=inter_file)


# ----------------------------------------------------------------------------------------------
# GroupLens MovieLens-100K


def load_grouplens(directory: str | Path, tmp: Path, *, drop_unknown: bool = False) -> SpilledLog:
    directory = Path(directory)
    data_file, item_file = directory / "u.data", directory / "u.item"
    for f in (data_file, item_file):
        if not f.is_file():
            raise DataError(f"{f}: file not found (expected the MovieLens-100K download: u.data, u.item)")

    titles_by_raw = {}
    for n, line in enumerate(item_file.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2:
            raise DataError(f"{item_file}:{n}: expected '|'-separated fields 'id|title|...', got {line[:60]!r}")
        title = normalize_title(fields[1])
        if title:
            titles_by_raw[fields[0].strip()] = title

    rows = _text_rows([data_file])
    log = _Log(tmp, partitions_for(rows), rows)
    where = _read_text_log(log, data_file, ["user", "item", "rating", "timestamp"], ("user", "item", "timestamp"),
                           header_lines=0, encoding="latin-1", describe="user, item, rating, timestamp",
                           strip=True)
    return build_interactions("grouplens:ml-100k", "movie", log, titles_by_raw, drop_unknown=drop_unknown,
                              where=where, missing_title="the item file", file=data_file)


# ----------------------------------------------------------------------------------------------
# Parquet and CSV logs with a column mapping (prepare.user_field / item_field / time_field / title_field)

TABULAR_DEFAULTS = {"user": "user_id", "item": "item_id", "time": "timestamp", "title": "title"}


def _tabular_files(path: Path, suffix: str) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(suffix) and p.is_file())
        if files:
            return files
        raise DataError(f"{path}: no *{suffix} file found")
    raise DataError(f"{path}: input file or directory not found")


def _tabular_batches(path: Path, fmt: str, fields: dict[str, str]) -> Iterator[pa.RecordBatch]:
    """The mapped columns of one Parquet/CSV file as record batches (streaming)."""
    wanted = list(dict.fromkeys(fields.values()))
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(path)
            have = pf.schema_arrow.names
        else:
            with open(path, encoding="utf-8", newline="") as f:
                have = next(pycsv.reader([f.readline()]), [])
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable {fmt} file ({e})") from None
    for role, name in fields.items():
        if name not in have:
            raise DataError(f"{path}: missing {role} column {name!r} (set prepare.{role}_field; "
                            f"the file has {', '.join(map(str, have))})")
    try:
        if fmt == "parquet":
            yield from pf.iter_batches(batch_size=1 << 18, columns=wanted)
            return
        yield from pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=_BATCH_BYTES),
                                  convert_options=pacsv.ConvertOptions(
                                      column_types={c: pa.string() for c in wanted}, include_columns=wanted,
                                      strings_can_be_null=True))
    except pa.ArrowInvalid as e:
        if fmt == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                for row, rec in enumerate(pycsv.reader(f)):
                    if row and len(rec) != len(have):
                        raise DataError(f"{path}: row {row}: expected {len(have)} comma-separated fields "
                                        f"({', '.join(have)}), got {len(rec)}") from None
        raise DataError(f"{path}: not a readable {fmt} file ({e})") from None


def _id_column(col: pa.Array, name: str, role: str, where: Callable[[int], str], path: Path) -> pa.Array:
    """A user/item id column as strings (string, integer or dictionary-encoded, as pandas' categorical
    columns are written to Parquet); a missing or empty id names its row."""
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        row = int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(f"{where(row)}: {name}: expected a value, got an empty one")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        if not pa.types.is_integer(col.type):
            raise DataError(f"{path}: {name}: expected an integer or string {role} id column, got {col.type}")
        col = pc.cast(col, pa.string())
    empty = pc.equal(col, "").to_numpy(zero_copy_only=False)
    if empty.any():
        raise DataError(f"{where(int(np.argmax(empty)))}: {name}: expected a value, got an empty one")
    return col


@dataclass(frozen=True)
class Tabular:
    """A Parquet or CSV log: its files (read in name order) and the column mapping."""

    path: Path
    fmt: str
    fields: dict[str, str]  # role (user, item, time, title) -> column name
    files: list[Path]

    @classmethod
    def of(cls, path: str | Path, fmt: str, *, user_field: str | None = None, item_field: str | None = None,
           time_field: str | None = None, title_field: str | None = None) -> "Tabular":
        path = Path(path)
        fields = {"user": user_field or TABULAR_DEFAULTS["user"], "item": item_field or TABULAR_DEFAULTS["item"],
                  "time": time_field or TABULAR_DEFAULTS["time"], "title": title_field or TABULAR_DEFAULTS["title"]}
        return cls(path, fmt, fields, _tabular_files(path, ".parquet" if fmt == "parquet" else ".csv"))

    @property
    def source(self) -> str:
        return f"{self.fmt}:{self.path.stem}"

    @property
    def missing_title(self) -> str:
        return f"column {self.fields['title']!r} on its first row"

    def where(self, k: int, row: int) -> str:
        """File `k`'s 0-based data row `row`, as errors name it (rows numbered from 1 per file)."""
        return f"{self.files[k]}: row {row + 1}"

    def batches(self, k: int) -> Iterator[tuple[int, pa.Array, pa.Array, np.ndarray, pa.Array]]:
        """File `k`'s rows, batch by batch: (index in the file of the batch's first row, user ids,
        item ids (strings), times (float seconds), titles). A bad value names the file, row and field."""
        f, fields = self.files[k], self.fields
        base = 0
        for batch in _tabular_batches(f, self.fmt, fields):

            def at(row: int, base: int = base) -> str:
                return self.where(k, base + row)

            users = _id_column(batch.column(fields["user"]), fields["user"], "user", at, f)
            items = _id_column(batch.column(fields["item"]), fields["item"], "item", at, f)
            times = _numbers(batch.column(fields["time"]), at, fields["time"])
            yield base, users, items, times, batch.column(fields["title"])
            base += batch.num_rows


def first_rows(codes: np.ndarray, titles: pa.Array) -> tuple[np.ndarray, list[str]]:
    """The first row of each distinct code in a batch and its normalised title ("" for none)."""
    _, first = np.unique(codes, return_index=True)
    raw = titles.take(pa.array(first)).to_pylist()
    return first, [normalize_title(str(t)) if t is not None else "" for t in raw]


def load_tabular(path: str | Path, fmt: str, tmp: Path, *, drop_unknown: bool = False, user_field: str | None = None,
                 item_field: str | None = None, time_field: str | None = None,
                 title_field: str | None = None, domain: str = "movie") -> SpilledLog:
    """A Parquet or CSV log (a file, or a directory of part files read in name order), one row per
    interaction with user, item, time and item-title columns (names mapped by the ``*_field`` args).

    Read batch by batch. Rows are numbered from 1 per file, after the CSV header. A missing value
    names the file, the row and the field; an item's title is the one on its first row.
    """
    tab = Tabular.of(path, fmt, user_field=user_field, item_field=item_field, time_field=time_field,
                     title_field=title_field)
    starts: list[int] = []  # global row index of each file's first row

    def where(row: int) -> str:
        k = bisect.bisect_right(starts, row) - 1
        return tab.where(k, row - starts[k])

    rows = _tabular_rows(tab.files, fmt)
    log = _Log(tmp, partitions_for(rows), rows)
    titles_by_raw: dict[str, str] = {}
    for k in range(len(tab.files)):
        starts.append(log.rows)
        for _, users, items, times, titles in tab.batches(k):
            seen = len(log.items.index)
            codes = log.add(users, items, times)
            # Titles: each new item's first row in this batch names it (a loop per new item only).
            new = np.flatnonzero(codes >= seen)
            if len(new):
                raw = log.items.raw
                first, names = first_rows(codes[new], titles.take(pa.array(new)))
                titles_by_raw.update((raw[c], t) for c, t in zip(codes[new][first].tolist(), names) if t)
    return build_interactions(tab.source, domain, log, titles_by_raw, drop_unknown=drop_unknown,
                              where=where, missing_title=tab.missing_title, file=tab.path)


# ----------------------------------------------------------------------------------------------
# Synthetic data with learnable sequential structure

# Titles are "The <Adjective> <Noun>" (or "The <Adj> <Adj> <Noun>" for many items). No word contains
# "the" and the nouns are prefix-free, so (case-insensitively) no title is a substring of another:
# evaluation matches titles inside generated text and must never match a shorter title by accident.
_ADJECTIVES = (
    "Silent Golden Hidden Broken Crimson Distant Electric Frozen Gentle Hollow Iron Jade Lonely "
    "Midnight Northern Painted Quiet Restless Scarlet Shining Velvet Wild Amber Brave Copper Dusty "
    "Endless Fading Glass Burning Ivory Lucky Marble Neon Paper Rusty Secret Silver Stolen Sudden "
    "Sunken Tender Twisted Violet Wandering Wicked Young Ancient"
).split()
_NOUNS = (
    "Harbor Garden Kingdom Lantern Mirror Orchard Palace River Shadow Tower Valley Voyage Winter "
    "Bridge Canyon Desert Empire Forest Island Jungle Meadow Ocean Prairie Rainfall Summit Temple "
    "Thunder Village Whisper Comet Dragon Falcon Galaxy Horizon Journey Legend Machine Nightfall "
    "Prophet Quarry Signal Tide Circus Engine Festival Letter Compass Cathedral"
).split()


def synthetic_titles(n_items: int, rng: np.random.Generator) -> list[str]:
    """`n_items` distinct readable titles, none a substring of another (see above)."""
    a, n = len(_ADJECTIVES), len(_NOUNS)
    two, three = a * n, a * (a - 1) * n
    if n_items <= two:
        picks = rng.choice(two, size=n_items, replace=False)
        return [f"The {_ADJECTIVES[p // n]} {_NOUNS[p % n]}" for p in picks.tolist()]
    if n_items > three:
        raise DataError(f"prepare.items: the synthetic generator makes at most {three} distinct titles, "
                        f"got items={n_items}")
    picks = rng.choice(three, size=n_items, replace=False)
    titles = []
    for p in picks.tolist():
        first, rest = divmod(p, (a - 1) * n)
        second, noun = divmod(rest, n)
        second = second + (second >= first)  # two different adjectives
        titles.append(f"The {_ADJECTIVES[first]} {_ADJECTIVES[second]} {_NOUNS[noun]}")
    return titles


def generate_synthetic(users: int, items: int, seed: int, *, min_len: int = 8, max_len: int = 30) -> Interactions:
    """Users walking along chains of items inside latent clusters, drifting between clusters.

    Items are split into clusters, each an ordered chain. A user starts at a random point of a random
    cluster and mostly steps 1-2 items forward along the chain (a strong "what comes next" signal a
    sequential model can learn but popularity cannot); now and then the user drifts to the next
    cluster, and a few interactions are uniform noise. Nobody sees the same item twice.
    """
    if items < 8:
        raise DataError(f"prepare.items: the synthetic generator needs at least 8 items, got {items}")
    rng = np.random.default_rng(seed)
    titles = synthetic_titles(items, rng)
    n_clusters = max(2, items // 25)
    perm = rng.permutation(items)
    clusters = [perm[c::n_clusters].tolist() for c in range(n_clusters)]
    max_len = min(max_len, items // 2)
    min_len = min(min_len, max_len)
    sequences = []
    for _ in range(users):
        length = int(rng.integers(min_len, max_len + 1))
        c = int(rng.integers(n_clusters))
        chain = clusters[c]
        pos = int(rng.integers(len(chain)))
        seen: set[int] = set()
        seq: list[int] = []
        while len(seq) < length:
            r = rng.random()
            if r < 0.05:  # noise
                item = int(rng.integers(items))
            else:
                if r < 0.17:  # drift to the neighbouring cluster
                    c = (c + 1) % n_clusters
                    chain = clusters[c]
                    pos = int(rng.integers(len(chain)))
                else:
                    pos = (pos + (1 if rng.random() < 0.75 else 2)) % len(chain)
                item = chain[pos]
                for _ in range(len(chain)):  # never repeat: walk on along the chain
                    if item not in seen:
                        break
                    pos = (pos + 1) % len(chain)
                    item = chain[pos]
            while item in seen:  # chain exhausted (or noise hit a seen item): any unseen item
                item = (item + 1) % items
            seen.add(item)
            seq.append(item)
        sequences.append(seq)
    return Interactions.from_sequences("synthetic", "movie", titles, sequences)
