"""`llara-dist` command line: parse, build the config, call one function, print.

Every subcommand takes ``--config FILE`` and trailing dotted overrides (``train.lr=1e-4``);
its own options are shorthands for config keys and win over both.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from llara_dist.config import Config, load_config
from llara_dist.errors import ConfigError, LlaraError

# option dest -> dotted config key, per subcommand
_PREPARE_KEYS = {
    "format": "prepare.format",
    "input": "prepare.input",
    "out": "prepare.out",
    "users": "prepare.users",
    "items": "prepare.items",
    "seed": "prepare.seed",
    "history_len": "prepare.history_len",
    "min_history": "prepare.min_history",
    "num_candidates": "prepare.num_candidates",
    "samples_per_shard": "prepare.samples_per_shard",
    "drop_unknown": "prepare.drop_unknown",
    "domain": "prepare.domain",
    "engine": "prepare.engine",
}
_TRAIN_REC_KEYS = {"data": "data.shards", "model": "rec.model", "out": "rec.out", "epochs": "rec.epochs",
                   "seed": "rec.seed", "device": "rec.device", "hidden_size": "rec.hidden_size"}
_TRAIN_KEYS = {"run_dir": "run_dir"}
_EVAL_KEYS = {"split": "eval.split", "shards": "data.shards", "batch_size": "eval.batch_size",
              "prompt": "eval.prompt", "decoding": "eval.decoding", "workers": "eval.num_workers",
              "max_samples": "eval.max_samples", "max_new_tokens": "eval.max_new_tokens"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")


def _build_config(args: argparse.Namespace, keys: dict[str, str], config: str | None = None) -> Config:
    extra = []
    for dest, key in keys.items():
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        extra.append(f"{key}={value}" if not isinstance(value, bool) else f"{key}=true")
    return load_config(config if config is not None else args.config, list(args.overrides) + extra)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llara-dist", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="interaction logs -> seeded samples -> WebDataset shards")
    _common(p)
    p.add_argument("--format", choices=["synthetic", "recbole", "grouplens", "parquet", "csv"])
    p.add_argument("--input", help="input directory (recbole / grouplens), file or directory (parquet / csv)")
    p.add_argument("--out", help="output shard directory")
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--history-len", type=int)
    p.add_argument("--min-history", type=int)
    p.add_argument("--num-candidates", type=int)
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--drop-unknown", action="store_true", default=None)
    p.add_argument("--domain", choices=["movie", "game", "artist"])
    p.add_argument("--engine", choices=["local", "ray"],
                   help="ray: a Ray Data pipeline (default: ray when connected to a multi-node cluster)")

    p = sub.add_parser("train-rec", help="train SASRec / GRU4Rec / Caser and export the frozen item table")
    _common(p)
    p.add_argument("--data", help="shard directory from `llara-dist prepare`")
    p.add_argument("--model", choices=["sasrec", "gru4rec", "caser"])
    p.add_argument("--out", help="output directory")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--hidden-size", type=int)

    p = sub.add_parser("train", help="distributed LLaRA training (Ray Train x DeepSpeed ZeRO-3 x LoRA)")
    _common(p)
    p.add_argument("--run-dir", help="run directory (default: run_dir from the config)")
    p.add_argument("--replan", action="store_true", help="resume with the current config's plan (total steps, "
                   "effective batch, seed, curriculum, ...) instead of refusing a change")
    p.add_argument("--dry-run", action="store_true", help="check the config, data, tokenizer, model architecture "
                   "and DeepSpeed config and print the run plan with a per-GPU memory estimate; no workers, "
                   "no weights loaded (exit 0: all checks passed, 2: the first failure)")

    p = sub.add_parser("eval", help="evaluate a trained run on the stored candidates")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--config", help="config (default: RUN/config.yaml)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", choices=["test", "valid"])
    p.add_argument("--shards", help="shard directory (default: the run's)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--out", help="output directory (default: RUN/eval/SPLIT)")
    p.add_argument("--prompt", choices=["hybrid", "text"])
    p.add_argument("--decoding", choices=["free", "constrained", "score"])
    p.add_argument("--workers", type=int)
    p.add_argument("--max-samples", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--checkpoint", help="evaluate this checkpoint directory instead of RUN/final")

    p = sub.add_parser("report", help="plots and a Markdown summary of a run")
    p.add_argument("run_dir")

    p = sub.add_parser("pretrain-base", help="train the tiny preset as a plain causal LM on the train split's "
                       "text prompts and save it as a local HF checkpoint (CPU stand-in for a pretrained LLM)")
    _common(p)
    p.add_argument("--out", help="checkpoint directory (then use model.name_or_path=DIR)")
    p.add_argument("--steps", type=int)

    p = sub.add_parser("demo", help="the embedded default end to end: synthetic data -> rec -> train -> eval")
    p.add_argument("--out", default="demo", help="output directory (default: ./demo)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", help="base config (default: configs/tiny.yaml settings)")
    p.add_argument("overrides", nargs="*")
    return ap


def _cmd_prepare(args) -> int:
    from llara_dist.data.prepare import run_prepare

    run_prepare(_build_config(args, _PREPARE_KEYS))
    return 0


def _cmd_train_rec(args) -> int:
    from llara_dist.recommender.train import run_train_rec

    run_train_rec(_build_config(args, _TRAIN_REC_KEYS))
    return 0


def _cmd_train(args) -> int:
    if args.dry_run:
        from llara_dist.train.dry_run import dry_run

        print(dry_run(_build_config(args, _TRAIN_KEYS)), flush=True)
        return 0
    from llara_dist.train.driver import run_train

    run_train(_build_config(args, _TRAIN_KEYS), replan=args.replan)
    return 0


def _cmd_eval(args) -> int:
    from pathlib import Path

    from llara_dist.eval.evaluate import run_eval

    config = args.config or str(Path(args.run) / "config.yaml")
    cfg = _build_config(args, _EVAL_KEYS, config=config)
    run_eval(cfg, run_dir=args.run, out_dir=args.out, checkpoint=args.checkpoint)
    return 0


def _cmd_report(args) -> int:
    from llara_dist.eval.report import run_report

    run_report(args.run_dir)
    return 0


def _cmd_pretrain_base(args) -> int:
    from llara_dist.model.warm_base import pretrain_base

    cfg = _build_config(args, {"out": "pretrain.out", "steps": "pretrain.steps"})
    summary = pretrain_base(cfg)
    print(f"pretrain-base: {summary['steps']} steps, loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} "
          f"in {summary['seconds']:.0f} s; saved to {cfg.pretrain.out} (use model.name_or_path={cfg.pretrain.out})")
    return 0


def _cmd_demo(args) -> int:
    from llara_dist.demo import run_demo

    run_demo(out=args.out, workers=args.workers, config=args.config, overrides=list(args.overrides))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prepare": _cmd_prepare,
    "train-rec": _cmd_train_rec,
    "train": _cmd_train,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "demo": _cmd_demo,
    "pretrain-base": _cmd_pretrain_base,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"llara-dist {args.command}: config error:\n{e}", file=sys.stderr)
        return 2
    except (LlaraError, FileNotFoundError) as e:
        # Input problems are reported as one clear message, not a traceback.
        print(f"llara-dist {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
