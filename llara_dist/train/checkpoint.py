"""Checkpoints: save one rank's DeepSpeed state, find the latest complete one, convert across world sizes.

Layout of one checkpoint (Ray merges every rank's files into ``STORAGE/NAME/step_NNNNNNNN/``)::

    step_00000030/
      trainer_state.json          rank 0: the run's plan, step, data position, world size, DeepSpeed tag
      manifest/rank_00000.json    each rank: the files it wrote, with their sizes
      global_step30/...           DeepSpeed ZeRO files (trainable state only)
      latest                      DeepSpeed's pointer to the tag
      global_step30_universal/    created on demand when resuming on another world size

Why the manifests: a crash while a checkpoint is copied to storage can leave a directory with a
missing or truncated rank file. Ray only registers a checkpoint once every rank has reported, but
on resume we also verify the files themselves and fall back to the previous checkpoint (with a
warning) rather than crash or, worse, load a partial optimizer state.

The data position is the stream's *global* sample offset, so it means the same thing at any world
size; the curriculum and per-step RNG depend only on the global step, so nothing else is needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from llara_dist.errors import CheckpointError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_DIR = "manifest"
_STEP_DIR = re.compile(r"^step_(\d+)$")
UNIVERSAL_SUFFIX = "_universal"


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def ds_tag(step: int) -> str:
    return f"global_step{step}"


@dataclass
class TrainerState:
    """The run state written with every checkpoint: the run's plan and how far it got.

    ``plan`` (a :class:`llara_dist.train.run_state.RunPlan` as a dict) is fixed when the run
    starts and checked on every resume; the rest is the position to continue from.
    """

    step: int  # optimiser steps completed
    world_size: int  # world size that wrote the DeepSpeed files
    tag: str  # DeepSpeed tag inside the checkpoint directory
    stream: dict  # TrainStream.state_dict(): {"epoch", "offset" (global samples, world-size free), "ranges", "block"}
    zero_stage: int
    plan: dict = field(default_factory=dict)  # RunPlan.to_dict(); empty in checkpoints written before plans
    samples_seen: int = 0
    best_valid: dict | None = None  # the best valid HitRatio@1 so far (RUN/best)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "TrainerState":
        try:
            tree = json.loads(text)
            names = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in tree.items() if k in names})
        except (json.JSONDecodeError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: unreadable trainer state ({e})") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_rank_checkpoint(engine, out_dir: Path, state: TrainerState, rank: int) -> None:
    """Write this rank's part of the checkpoint for ``state.step`` into the local ``out_dir``.

    Collective: every rank must call it. ``out_dir`` is a per-rank scratch directory that is then
    handed to ``ray.train.report`` (Ray copies and merges the ranks' directories).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(out_dir), tag=state.tag, client_state={"trainer_state": asdict(state)},
                           exclude_frozen_parameters=True)
    from llara_dist.train.ranks import on_rank0

    on_rank0(lambda: _write_atomic(out_dir / STATE_FILE, state.to_json()), rank=rank)
    files = {p.relative_to(out_dir).as_posix(): p.stat().st_size
             for p in sorted(out_dir.rglob("*")) if p.is_file() and MANIFEST_DIR not in p.parts}
    (out_dir / MANIFEST_DIR).mkdir(exist_ok=True)
    _write_atomic(out_dir / MANIFEST_DIR / f"rank_{rank:05d}.json",
                  json.dumps({"rank": rank, "step": state.step, "files": files}, sort_keys=True))


def _storage(path, fs=None) -> tuple:
    """``(filesystem, path string)``: a plain local path unless a ``pyarrow.fs`` filesystem is given."""
    import pyarrow.fs

    if fs is None:
        return pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())
    return fs, str(path).rstrip("/")


def _read_text(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def validate_checkpoint(path, fs=None) -> TrainerState:
    """The checkpoint's trainer state if every rank's files are present and complete, else CheckpointError.

    ``fs`` is the storage's ``pyarrow.fs`` filesystem (default: ``path`` is local); on remote
    storage the check reads sizes and the small JSON files only, nothing is downloaded.
    """
    import pyarrow.fs

    fs, path = _storage(path, fs)
    state_file = f"{path}/{STATE_FILE}"
    if fs.get_file_info(state_file).type != pyarrow.fs.FileType.File:
        raise CheckpointError(f"{path}: no {STATE_FILE} (incomplete checkpoint, rank 0's files are missing)")
    state = TrainerState.from_json(_read_text(fs, state_file), state_file)
    for rank in range(state.world_size):
        manifest = f"{path}/{MANIFEST_DIR}/rank_{rank:05d}.json"
        if fs.get_file_info(manifest).type != pyarrow.fs.FileType.File:
            raise CheckpointError(f"{path}: rank {rank} of {state.world_size} wrote no manifest "
                                  f"(rank_{rank:05d}.json missing): its files never reached storage")
        try:
            files = json.loads(_read_text(fs, manifest))["files"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{manifest}: unreadable ({e})") from None
        infos = fs.get_file_info([f"{path}/{rel}" for rel in files]) if files else []
        for (rel, size), info in zip(files.items(), infos):
            if info.type != pyarrow.fs.FileType.File:
                raise CheckpointError(f"{path}: rank {rank}'s file {rel} is missing")
            if info.size != size:
                raise CheckpointError(f"{path}: rank {rank}'s file {rel} has {info.size} bytes, "
                                      f"expected {size} (truncated)")
    if fs.get_file_info(f"{path}/{state.tag}").type != pyarrow.fs.FileType.Directory:
        raise CheckpointError(f"{path}: DeepSpeed tag directory {state.tag}/ is missing")
    return state


def step_dirs(parent, fs=None) -> list[str]:
    """``step_*`` checkpoint directories under ``parent``, newest (highest step) first."""
    import pyarrow.fs

    fs, parent = _storage(parent, fs)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    except NotADirectoryError:
        return []
    found = [(int(m.group(1)), i.path) for i in infos
             if i.type == pyarrow.fs.FileType.Directory and (m := _STEP_DIR.match(i.base_name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resumable(latest, fs=None) -> tuple[str, TrainerState]:
    """``latest`` if complete, else the newest complete older sibling, warning about each one skipped.

    The siblings are listed on the storage itself (``fs``), so the fallback works on remote
    storage too (a downloaded copy of ``latest`` has no siblings).
    """
    fs, latest = _storage(latest, fs)
    parent, _, name = latest.rpartition("/")
    candidates = [latest] + [p for p in step_dirs(parent, fs) if _older(p.rsplit("/", 1)[-1], name)]
    problems = []
    for path in candidates:
        try:
            state = validate_checkpoint(path, fs)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            msg = f"skipping an incomplete checkpoint: {problem}; resuming from {path.rsplit('/', 1)[-1]} instead"
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
        return path, state
    raise CheckpointError("no complete checkpoint to resume from:\n  " + "\n  ".join(problems)
                          + "\n(delete the run's checkpoints/ directory to start over)")


def _older(name: str, than: str) -> bool:
    a, b = _STEP_DIR.match(name), _STEP_DIR.match(than)
    return bool(a and b and int(a.group(1)) < int(b.group(1)))


def ensure_universal(path: Path, state: TrainerState) -> str:
    """Convert ``path/TAG`` to DeepSpeed's universal format once; returns the universal tag.

    Called by one rank. The conversion writes into a temporary folder that is renamed into place,
    so an interrupted conversion is simply redone and a reader never sees half of one.
    """
    tag = state.tag + UNIVERSAL_SUFFIX
    target = Path(path) / tag
    if (target / "zero").is_dir():
        return tag
    tmp = Path(tempfile.mkdtemp(prefix=f".{tag}.", dir=path))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(path) / state.tag),
           "--output_folder", str(tmp / "out"), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{path}: conversion of {state.tag} (world size {state.world_size}) to the universal "
                              f"format failed:\n{proc.stderr[-2000:]}")
    if target.exists():  # a conversion that died before its rename left nothing usable
        shutil.rmtree(target)
    os.replace(tmp / "out", target)
    shutil.rmtree(tmp, ignore_errors=True)
    return tag


# ----------------------------------------------------------------------------------------------
# Inside the workers: which checkpoint to resume, and the final export


@dataclass
class Resume:
    path: Path  # local (or shared) checkpoint directory
    state: TrainerState
    tag: str  # DeepSpeed tag to load (the universal one after a world-size change)
    universal: bool


def pick_checkpoint(checkpoint, *, world_size: int, rank: int) -> Resume | None:
    """The checkpoint to resume (Ray's latest, or an older complete one), the same on every rank.

    Collective. Rank 0 walks the run's checkpoints on the storage filesystem (local, NFS or a
    cloud URI, through ``pyarrow.fs``) and picks the newest complete one; every rank receives its
    decision, or its error, whatever it is (:func:`llara_dist.train.ranks.on_rank0`). On storage
    every worker sees, rank 0 also converts to the universal format when the world size changed;
    on remote storage each rank downloads the chosen checkpoint and converts its own copy.
    """
    if checkpoint is None:
        return None
    import pyarrow.fs

    from llara_dist.train.ranks import on_rank0

    fs = checkpoint.filesystem
    shared = isinstance(fs, pyarrow.fs.LocalFileSystem)
    path, state = on_rank0(lambda: find_resumable(checkpoint.path, fs), rank=rank)
    if not shared:
        path = download_checkpoint(fs, path)
    path = Path(path)
    if state.world_size == world_size:
        return Resume(path, state, state.tag, universal=False)
    log.warning("resuming %s written by %d workers on %d workers: converting it to DeepSpeed's universal format",
                path.name, state.world_size, world_size)
    tag = on_rank0(lambda: ensure_universal(path, state), rank=rank) if shared else ensure_universal(path, state)
    return Resume(path, state, tag, universal=True)


def download_checkpoint(fs, path: str) -> str:
    """A local copy of the checkpoint directory ``path`` on ``fs`` (a fresh temporary directory)."""
    import pyarrow.fs

    local = Path(tempfile.mkdtemp(prefix="llara-resume-")) / path.rstrip("/").rsplit("/", 1)[-1]
    local.mkdir()
    pyarrow.fs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return str(local)
