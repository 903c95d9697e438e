"""Raw interaction logs -> per-user item sequences with dense item ids and titles.

Three sources feed `llara-dist prepare`:

- ``recbole``: RecBole atomic files (``*.inter`` with user/item/timestamp columns, ``*.item`` with an
  id and a title column, typed headers such as ``item_id:token``).
- ``grouplens``: the raw MovieLens-100K download (``u.data``, ``u.item``; latin-1, ``Title (Year)``).
- ``synthetic``: a generated data set with learnable sequential structure (see `generate_synthetic`).

Item ids are dense ``0..n_items-1``: the items that occur in the kept interactions, sorted by their
raw id (numerically when every raw id is an integer, else as strings). Users are numbered the same
way. Every problem with the input raises `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llara_dist.errors import DataError


@dataclass
class Interactions:
    """A data set ready for splitting: each user's items in time order, plus the item titles."""

    source: str
    domain: str
    titles: list[str]  # index = dense item id
    sequences: list[list[int]]  # index = dense user id; oldest interaction first
    filtered: dict[str, int] = field(default_factory=dict)  # what was dropped, and why


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
# Dense ids


def _sorted_raw_ids(raw_ids) -> list[str]:
    ids = list(raw_ids)
    if all(re.fullmatch(r"-?\d+", i) for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))  # "007" and "7" stay distinct, in a fixed order
    return sorted(ids)


def _build(source: str, domain: str, rows: list[tuple[str, str, float]], titles_by_raw: dict[str, str],
           filtered: dict[str, int]) -> Interactions:
    """rows: (raw user, raw item, timestamp) in input order, every item known to `titles_by_raw`."""
    item_ids = {raw: i for i, raw in enumerate(_sorted_raw_ids({r[1] for r in rows}))}
    user_ids = {raw: u for u, raw in enumerate(_sorted_raw_ids({r[0] for r in rows}))}
    per_user: list[list[tuple[float, int, int]]] = [[] for _ in user_ids]
    for order, (user, item, ts) in enumerate(rows):
        per_user[user_ids[user]].append((ts, order, item_ids[item]))
    # Time order; ties keep input order (the `order` field), so the result is stable.
    sequences = [[item for _, _, item in sorted(events)] for events in per_user]
    titles = [""] * len(item_ids)
    for raw, i in item_ids.items():
        titles[i] = titles_by_raw[raw]
    return Interactions(source=source, domain=domain, titles=titles, sequences=sequences, filtered=filtered)


def _attach_titles(rows, titles_by_raw: dict[str, str], drop_unknown: bool, inter_file: Path,
                   lines: list[int]) -> tuple[list, dict[str, int]]:
    """Keep interactions whose item has a title; without --drop-unknown a missing one is an error."""
    kept, dropped = [], 0
    for row, line in zip(rows, lines):
        if row[1] in titles_by_raw:
            kept.append(row)
        elif drop_unknown:
            dropped += 1
        else:
            raise DataError(f"{inter_file}:{line}: item {row[1]!r} has no title in the item file "
                            "(pass --drop-unknown to drop such interactions)")
    return kept, {"unknown_item_interactions": dropped}


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


def load_recbole(directory: str | Path, *, drop_unknown: bool = False, item_field: str | None = None,
                 title_field: str | None = None) -> Interactions:
    """Read ``*.inter`` and ``*.item``; `item_field` / `title_field` override the detected columns."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: input directory not found")
    inter_file, item_file = _one_file(directory, "*.inter"), _one_file(directory, "*.item")

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

    header, rows = _read_atomic(inter_file)
    u_col = _column(header, ("user_id",), inter_file, "user id")
    i_col = _column(header, (item_field,), inter_file, "item id")
    t_col = _column(header, ("timestamp",), inter_file, "timestamp")
    events, lines = [], []
    for n, fields in rows:
        try:
            ts = float(fields[t_col])
        except ValueError:
            raise DataError(f"{inter_file}:{n}: timestamp: expected a number, got {fields[t_col]!r}") from None
        events.append((fields[u_col], fields[i_col], ts))
        lines.append(n)
    events, filtered = _attach_titles(events, titles_by_raw, drop_unknown, inter_file, lines)
    if not events:
        raise DataError(f"{inter_file}: no interactions")
    return _build("recbole:" + inter_file.stem, _guess_domain(inter_file.stem), events, titles_by_raw, filtered)


# ----------------------------------------------------------------------------------------------
# GroupLens MovieLens-100K


def load_grouplens(directory: str | Path, *, drop_unknown: bool = False) -> Interactions:
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

    events, lines = [], []
    for n, line in enumerate(data_file.read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise DataError(f"{data_file}:{n}: expected 4 tab-separated fields "
                            f"(user, item, rating, timestamp), got {len(fields)}")
        try:
            ts = float(fields[3])
        except ValueError:
            raise DataError(f"{data_file}:{n}: timestamp: expected a number, got {fields[3]!r}") from None
        events.append((fields[0].strip(), fields[1].strip(), ts))
        lines.append(n)
    events, filtered = _attach_titles(events, titles_by_raw, drop_unknown, data_file, lines)
    if not events:
        raise DataError(f"{data_file}: no interactions")
    return _build("grouplens:ml-100k", "movie", events, titles_by_raw, filtered)


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
    return Interactions(source="synthetic", domain="movie", titles=titles, sequences=sequences, filtered={})
