"""`llara-dist eval`: evaluate an exported LLaRA model on a split's stored candidates with Ray workers.

Each Ray task loads the export, takes a disjoint strided part of the split (sample ``i`` goes to
worker ``i % W``), and decodes it in batches; the driver gathers the rows, puts them back in stored
order and writes ``metrics.json`` and ``predictions.csv``. Plain inference needs no ZeRO-3 (each
worker holds the whole model), so workers never wait on each other and nothing can deadlock; the
ZeRO-3 case (validation inside training) is ``llara_dist.eval.validation``.

Three decodings (``eval.decoding``): ``free`` (the paper's protocol: greedy, first line, matched
against the candidate titles), ``constrained`` (greedy restricted to the candidate titles by a
prefix trie) and ``score`` (candidates ranked by the likelihood of their title; adds HR@5 and
NDCG@5/@10). The recommender and popularity are scored on the very same candidates.
"""

from __future__ import annotations

import csv
import functools
import json
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from llara_dist.config import Config
from llara_dist.data.tokenizer import encode_answers
from llara_dist.errors import CheckpointError, ConfigError
from llara_dist.eval.decoding import CandidateTrie, continuation_logprobs
from llara_dist.eval.metrics import generation_metrics, match_answer, ranking_metrics

PREDICTION_COLUMNS = ["key", "user", "target", "target_title", "candidates", "generated", "matched", "valid",
                      "correct"]


@dataclass(frozen=True)
class EvalSettings:
    """What decides one sample's result (everything else, e.g. worker count, must not)."""

    prompt: str = "hybrid"  # hybrid | text
    decoding: str = "free"  # free | constrained | score
    batch_size: int = 8
    max_new_tokens: int = 64
    max_length: int = 1024
    domain: str = "movie"
    seed: int = 0  # prompt template choice
    length_norm: bool = False  # score decoding: mean instead of summed token log-probability


# ----------------------------------------------------------------------------------------------
# The model side: tokens of an answer, stop tokens, the causal LM inside LlaraModel


def answer_token_ids(tokenizer, title: str) -> list[int]:
    """The tokens training puts after the prompt for ``title``, ending with EOS.

    Mirrors ``TrainCollator`` (`encode_answers`, then EOS), so the trie and the scores see exactly
    the sequences the model was trained on.
    """
    return encode_answers(tokenizer, [title])[0] + [int(tokenizer.eos_token_id)]


@functools.lru_cache(maxsize=8)
def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """EOS plus every token whose text contains a newline (the answer is the first line)."""
    ids = {int(tokenizer.eos_token_id)}
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]):
            ids.add(i)
    return tuple(sorted(ids))


def causal_lm(model) -> torch.nn.Module:
    """The (PEFT-wrapped) causal LM of a ``LlaraModel``: what ``decoding`` drives with embeddings."""
    return model.lm


def _device(model) -> torch.device:
    return next(model.parameters()).device


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


# ----------------------------------------------------------------------------------------------
# One worker's job: samples in, one result row per sample out


def evaluate_samples(
    model,
    tokenizer,
    samples: Sequence[dict],
    titles: Sequence[str],
    item_table: torch.Tensor,
    settings: EvalSettings,
    *,
    sync_ranks: bool | None = None,
    progress: str | None = None,
) -> list[dict]:
    """Decode ``samples`` in batches of ``settings.batch_size``; one row per sample (stored order).

    Rows carry ``key, user, target, target_title, candidates, generated, matched, valid, correct``
    and, for score decoding, ``scores`` (one per candidate). ``sync_ranks`` is passed to
    ``LlaraModel.generate`` so ZeRO-3 ranks keep stepping together (see ``validation``).

    The steps: pick the decoding (:class:`_Decoder`), then for each batch build the prompts,
    collate them, and let the decoding turn the batch into rows.
    """
    from llara_dist.data.collate import GenerationCollator
    from llara_dist.data.prompts import build_prompt

    decoder = _Decoder(model, tokenizer, titles, item_table.to(_device(model)), settings, sync_ranks)
    decode = {"free": decoder.free, "constrained": decoder.constrained, "score": decoder.score}[settings.decoding]
    collator = GenerationCollator(tokenizer, settings.max_length)
    rows: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        for chunk in _batches(samples, settings.batch_size, progress):
            prompts = [build_prompt(s, titles, mode=settings.prompt, domain=settings.domain, seed=settings.seed)
                       for s in chunk]
            batch = {k: v.to(decoder.device) if torch.is_tensor(v) else v for k, v in collator(prompts).items()}
            rows += decode(chunk, batch)
    finally:
        model.train(was_training)
    return rows


def _batches(samples: Sequence[dict], size: int, progress: str | None) -> Iterable[Sequence[dict]]:
    """``samples`` in consecutive chunks of ``size`` (with a progress bar when ``progress`` names one)."""
    starts: Iterable[int] = range(0, len(samples), size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", mininterval=5)
    return (samples[start:start + size] for start in starts)


class _Decoder:
    """One decoding mode applied to a collated batch: ``free``, ``constrained`` or ``score``.

    Each mode maps (samples, batch) to one result row per sample; what they share (the model, the
    tokenizer's ids, each item's answer tokens, tokenised once) lives here.
    """

    def __init__(self, model, tokenizer, titles: Sequence[str], item_table: torch.Tensor,
                 settings: EvalSettings, sync_ranks: bool | None):
        self.model, self.tokenizer, self.titles, self.item_table = model, tokenizer, titles, item_table
        self.settings, self.sync_ranks = settings, sync_ranks
        self.device = item_table.device
        self.pad_id = int(tokenizer.pad_token_id)
        self._answers: dict[int, list[int]] = {}

    def answer(self, item: int) -> list[int]:
        """``item``'s title as the tokens training puts after the prompt (+EOS), tokenised once."""
        if item not in self._answers:
            self._answers[item] = answer_token_ids(self.tokenizer, self.titles[item])
        return self._answers[item]

    def _inputs(self, batch: dict) -> tuple:
        return batch["input_ids"], batch["attention_mask"], batch["slots"], batch["batch_items"], self.item_table

    def free(self, chunk: Sequence[dict], batch: dict) -> list[dict]:
        """Greedy until EOS or a newline token; the first line is matched against the candidates."""
        out = self.model.generate(*self._inputs(batch), max_new_tokens=self.settings.max_new_tokens,
                                  stop_token_ids=stop_token_ids(self.tokenizer), sync_ranks=self.sync_ranks)
        return self._generated_rows(chunk, out)

    def constrained(self, chunk: Sequence[dict], batch: dict) -> list[dict]:
        """Greedy restricted by a trie over the sample's candidate titles: every answer is one of them."""
        tries = [CandidateTrie([self.answer(c) for c in s["candidates"]]) for s in chunk]
        out = self.model.generate(*self._inputs(batch), max_new_tokens=self.settings.max_new_tokens,
                                  stop_token_ids=[int(self.tokenizer.eos_token_id)], constraints=tries,
                                  sync_ranks=self.sync_ranks)
        return self._generated_rows(chunk, out)

    def score(self, chunk: Sequence[dict], batch: dict) -> list[dict]:
        """Every candidate scored by the log-likelihood of its answer tokens; the best one is the answer."""
        with torch.no_grad():
            embeds = self.model.embed(batch["input_ids"], batch["slots"], batch["batch_items"], self.item_table)
        mask = batch["attention_mask"].bool()
        rows = []
        for b, s in enumerate(chunk):
            scores = continuation_logprobs(causal_lm(self.model), embeds[b][mask[b]],
                                           [self.answer(c) for c in s["candidates"]], pad_id=self.pad_id,
                                           length_norm=self.settings.length_norm)
            best = s["candidates"][int(np.argmax(scores))]
            rows.append(_row(s, self.titles, self.titles[best], scores=scores))
        return rows

    def _generated_rows(self, chunk: Sequence[dict], out: list[list[int]]) -> list[dict]:
        return [_row(s, self.titles, first_line(self.tokenizer.decode(toks, skip_special_tokens=True)))
                for s, toks in zip(chunk, out)]


def _row(sample: dict, titles: Sequence[str], generated: str, scores: np.ndarray | None = None) -> dict:
    cand_titles = [titles[c] for c in sample["candidates"]]
    m = match_answer(generated, cand_titles, titles[sample["target"]])
    row = {
        "key": sample["key"],
        "user": sample.get("user"),
        "target": sample["target"],
        "target_title": titles[sample["target"]],
        "candidates": list(sample["candidates"]),
        "generated": generated,
        "matched": m.matched or "",
        "valid": m.valid,
        "correct": m.correct,
    }
    if scores is not None:
        row["scores"] = [float(x) for x in scores]
    return row


# ----------------------------------------------------------------------------------------------
# Ray: one task per worker, each on its own strided part


def _part_limit(n_total: int, rank: int, world: int) -> int:
    """How many of ``rank``'s strided samples fall among the first ``n_total`` of the split."""
    return max(0, (n_total - rank + world - 1) // world)


def _eval_part(export_dir: str, shard_dir: str, split: str, rank: int, world: int, n_total: int,
               table: np.ndarray, settings: EvalSettings, threads: int) -> list[tuple[int, dict]]:
    """Ray task body: evaluate this worker's part; rows tagged with their index in the split."""
    from llara_dist.data.shards import load_titles, read_split_part
    from llara_dist.model.llara import as_item_table, load_export

    torch.set_num_threads(max(1, threads))
    # The base loads straight onto the worker's device: one copy of the weights, never a host copy
    # per GPU worker first.
    model, tokenizer, _ = load_export(export_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    samples = list(islice(read_split_part(shard_dir, split, rank, world), _part_limit(n_total, rank, world)))
    item_table = as_item_table(table)  # shared read-only memory; nothing writes to it
    rows = evaluate_samples(model, tokenizer, samples, load_titles(shard_dir), item_table, settings,
                            progress=f"eval worker {rank}/{world}")
    return [(rank + j * world, row) for j, row in enumerate(rows)]


def gather_rows(parts: Iterable[list[tuple[int, dict]]]) -> list[dict]:
    """Merge the workers' rows back into stored order (identical for any worker count)."""
    return [row for _, row in sorted((r for part in parts for r in part), key=lambda t: t[0])]


def resolve_export(cfg: Config, run_dir: Path, checkpoint: str | None) -> Path:
    """The export directory to evaluate: ``--checkpoint`` if given, else ``RUN/final``.

    A checkpoint may be an export (``llara_config.json``) or a DeepSpeed training checkpoint
    (``latest`` + ZeRO files, e.g. ``RUN/checkpoints/step_00000030``), which is exported first.
    """
    path = Path(checkpoint) if checkpoint else run_dir / "final"
    if (path / "llara_config.json").is_file():
        return path
    if checkpoint and (path / "latest").is_file():
        return export_from_checkpoint(cfg, path, run_dir / "eval" / f"export-{path.name}")
    raise CheckpointError(f"{path}: neither an export (no llara_config.json; RUN/final is written at the end of "
                          "`llara-dist train`) nor a DeepSpeed checkpoint (no 'latest' file)")


def export_from_checkpoint(cfg: Config, ckpt: Path, out: Path) -> Path:
    """Turn a DeepSpeed ZeRO checkpoint of a run into an export (reused if already there).

    The trainable tensors (LoRA + projector) are merged from all ranks' partitions; the frozen
    parts come from rebuilding the model with the run's config, exactly as training built it.
    """
    if (out / "llara_config.json").is_file():
        return out
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from llara_dist.data.shards import load_meta, load_titles
    from llara_dist.model.llara import build_model, load_tokenizer, write_export
    from llara_dist.recommender.table import load_item_table

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), exclude_frozen_parameters=True)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: cannot read the DeepSpeed checkpoint: {e}") from None
    table, _ = load_item_table(cfg.train.rec_dir, load_meta(cfg.data.shards))
    tokenizer = load_tokenizer(cfg.model, load_titles(cfg.data.shards))
    model = build_model(cfg, tokenizer, table.shape[1])
    # The merged fp32 master copy is exported as it is (like RUN/final); load_export casts it.
    write_export(model, tokenizer, out, state=state, extra_config={"source_checkpoint": str(ckpt)})
    return out


def _settings(cfg: Config, domain: str) -> EvalSettings:
    return EvalSettings(prompt=cfg.eval.prompt, decoding=cfg.eval.decoding, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, max_length=cfg.data.max_length,
                        domain=domain, seed=cfg.train.seed, length_norm=cfg.eval.length_norm)


def default_out_dir(run_dir: Path, cfg: Config) -> Path:
    """``RUN/eval/SPLIT`` for the default protocol; non-default prompt/decoding get a suffix."""
    name = cfg.eval.split
    if cfg.eval.prompt != "hybrid":
        name += f"-{cfg.eval.prompt}"
    if cfg.eval.decoding != "free":
        name += f"-{cfg.eval.decoding}"
    return run_dir / "eval" / name


def _baseline(scores: np.ndarray, samples: list[dict], **extra) -> dict:
    targets = [s["candidates"].index(s["target"]) for s in samples]
    return {**extra, **ranking_metrics(list(scores), targets)}


def run_eval(cfg: Config, run_dir: str | Path, out_dir: str | Path | None = None,
             checkpoint: str | None = None) -> dict:
    """Evaluate a run on ``cfg.eval.split``; writes metrics.json + predictions.csv, returns the metrics."""
    import ray

    from llara_dist.data.shards import load_meta, read_split
    from llara_dist.ray_session import connect_ray
    from llara_dist.recommender.scoring import popularity_scores, score_candidates
    from llara_dist.recommender.table import load_item_table

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    export_dir = resolve_export(cfg, run_dir, checkpoint)
    shard_dir, split = cfg.data.shards, cfg.eval.split
    meta = load_meta(shard_dir)
    samples = list(islice(read_split(shard_dir, split), cfg.eval.max_samples))
    if not samples:
        raise ConfigError(f"{shard_dir}: split {split!r} has no samples to evaluate")
    table, rec_meta = load_item_table(cfg.train.rec_dir, meta)
    settings = _settings(cfg, cfg.data.domain or meta["domain"])
    world = min(cfg.eval.num_workers, len(samples))

    started_ray = connect_ray(cfg)
    try:
        use_gpu = cfg.scaling.use_gpu
        cpus = float(cfg.scaling.resources_per_worker.get("CPU", 1))
        task = ray.remote(_eval_part).options(num_cpus=cpus, num_gpus=1 if use_gpu else 0)
        table_ref = ray.put(table)
        futures = [task.remote(str(export_dir), str(shard_dir), split, rank, world, len(samples), table_ref,
                               settings, int(cpus)) for rank in range(world)]
        rows = gather_rows(ray.get(futures))
    finally:
        if started_ray:
            ray.shutdown()
    if [r["key"] for r in rows] != [s["key"] for s in samples]:
        raise RuntimeError("eval workers returned rows that do not match the split's samples")

    if settings.decoding == "score":
        llara = _baseline(np.array([r["scores"] for r in rows]), samples)
        llara.update(valid_ratio=1.0, **{"hit_ratio@1_among_valid": llara["hit_ratio@1"]})
    else:
        llara = generation_metrics([r["valid"] for r in rows], [r["correct"] for r in rows])
    metrics = {
        "split": split,
        "prompt": settings.prompt,
        "decoding": settings.decoding,
        **llara,
        "recommender": _baseline(score_candidates(cfg.train.rec_dir, samples), samples,
                                 model=rec_meta.get("model", "recommender")),
        "popularity": _baseline(popularity_scores(shard_dir, samples), samples),
        "export": str(export_dir),
        "shards": str(shard_dir),
        "workers": world,
        "batch_size": settings.batch_size,
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(out_dir) if out_dir else default_out_dir(run_dir, cfg)
    write_outputs(out, metrics, rows)
    print(format_table(metrics))
    print(f"eval: wrote {out / 'metrics.json'} and {out / 'predictions.csv'}")
    return metrics


# ----------------------------------------------------------------------------------------------
# Outputs


def write_outputs(out: Path, metrics: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    columns = PREDICTION_COLUMNS + (["scores"] if rows and "scores" in rows[0] else [])
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([" ".join(map(str, r[c])) if c in ("candidates", "scores") else
                        int(r[c]) if c in ("valid", "correct") else r[c] for c in columns])


def format_table(m: dict) -> str:
    def ci(d: dict) -> str:
        lo, hi = d["hit_ratio@1_ci95"]
        return f"{d['hit_ratio@1']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"{m['split']} split, {m['n']} samples, prompt={m['prompt']}, decoding={m['decoding']}",
             f"{'model':<14}{'HitRatio@1 [95% CI]':<26}{'ValidRatio':>11}"]
    lines.append(f"{'LLaRA':<14}{ci(m):<26}{m['valid_ratio']:>11.3f}")
    lines.append(f"{m['recommender'].get('model', 'recommender'):<14}{ci(m['recommender']):<26}{'-':>11}")
    lines.append(f"{'popularity':<14}{ci(m['popularity']):<26}{'-':>11}")
    return "\n".join(lines)
