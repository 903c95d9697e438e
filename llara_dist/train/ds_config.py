"""DeepSpeed config: a JSON template from `ds_configs/` with its "auto" values filled from the YAML.

Batch size, accumulation, precision, optimizer and scheduler values come from the run's YAML only,
so the two files can never disagree. A template may still spell a value out instead of "auto"; if
that value contradicts the YAML the run is refused before any worker starts (a silent mismatch,
e.g. a different learning rate in the JSON, would otherwise win inside DeepSpeed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from llara_dist.config import Config
from llara_dist.errors import ConfigError

AUTO = "auto"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_ds_config_path(path: str) -> Path:
    """The template path as given (relative to the working directory), else relative to the repo.

    The fallback lets `ray job submit --working-dir` jobs and tests started elsewhere find the
    shipped templates without an absolute path in the YAML.
    """
    p = Path(path)
    for candidate in (p, _REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.ds_config: DeepSpeed config {path!r} not found "
                      f"(looked in {Path.cwd()} and {_REPO_ROOT}; expected e.g. ds_configs/zero3.json)")


def load_ds_template(path: str) -> tuple[dict, Path]:
    p = resolve_ds_config_path(path)
    try:
        tree = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a JSON object at the top level")
    return tree, p


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(tree: dict, dotted: str, value: Any, yaml_key: str, source: Path, *, create: bool = True) -> None:
    """Set ``tree[dotted]`` to ``value`` if it is "auto" or absent; refuse a contradicting value."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if k not in node:
            if not create:
                return
            node[k] = {}
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted}: expected an object at {k!r}")
    last = keys[-1]
    current = node.get(last, AUTO)
    if current == AUTO:
        node[last] = value
        return
    same = (isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, (int, float))
            and abs(float(current) - float(value)) <= 1e-12 * max(1.0, abs(float(value))))
    if not same and current != value:
        raise ConfigError(f"{source}: {dotted} is {current!r} but the YAML gives {yaml_key} = {value!r}; "
                          f"write \"auto\" in the DeepSpeed config (it is filled from the YAML) or make them agree")


def build_ds_config(cfg: Config, *, world_size: int, total_steps: int, hidden_size: int,
                    load_universal: bool = False) -> dict:
    """The DeepSpeed config for one run at ``world_size`` workers, every "auto" filled."""
    template, src = load_ds_template(cfg.train.ds_config)
    ds = copy.deepcopy(template)
    t = cfg.train
    micro, accum = t.micro_batch_size, t.grad_accum

    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", src)
    _fill(ds, "gradient_accumulation_steps", accum, "train.grad_accum", src)
    _fill(ds, "train_batch_size", micro * accum * world_size,
          f"train.micro_batch_size x train.grad_accum x {world_size} workers", src)
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip", src)
    _fill(ds, "bf16.enabled", cfg.model.dtype == "bfloat16", "model.dtype", src)
    _fill(ds, "fp16.enabled", cfg.model.dtype == "float16", "model.dtype", src)

    if "optimizer" in ds:
        _fill(ds, "optimizer.params.lr", t.lr, "train.lr", src)
        _fill(ds, "optimizer.params.weight_decay", t.weight_decay, "train.weight_decay", src)
        torch_adam = t.optimizer == "torch"
        _fill(ds, "optimizer.params.torch_adam", torch_adam, "train.optimizer (torch_adam)", src)
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        if torch_adam and offload:
            # DeepSpeed insists on its compiled CPU Adam for offloaded states unless told otherwise.
            _fill(ds, "zero_force_ds_cpu_optimizer", False, "train.optimizer (torch)", src)
        if torch_adam and cfg.scaling.use_gpu and not offload:
            # One fused CUDA kernel for all trainable tensors instead of one launch per tensor.
            _fill(ds, "optimizer.params.fused", True, "train.optimizer (torch) on GPU", src)
    else:
        raise ConfigError(f"{src}: no \"optimizer\" section; expected e.g. "
                          "{\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\", \"torch_adam\": \"auto\"}}")
    if "scheduler" in ds:
        _fill(ds, "scheduler.params.total_num_steps", total_steps, "train.max_steps / train.epochs", src)
        # DeepSpeed requires a positive warm-up; 1 step means "start at lr" (no warm-up to speak of).
        _fill(ds, "scheduler.params.warmup_num_steps", max(1, t.warmup_steps), "train.warmup_steps", src)
        _fill(ds, "scheduler.params.warmup_min_ratio", t.min_lr_ratio, "train.min_lr_ratio", src)
        _fill(ds, "scheduler.params.cos_min_ratio", t.min_lr_ratio, "train.min_lr_ratio", src)

    # Bucket sizes follow the Hugging Face integration's rule of thumb; they are tuning, not
    # semantics, so a concrete value in the template is simply kept.
    zero = ds.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("allgather_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == AUTO:
            zero[key] = value
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True

    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{src}: cannot fill {', '.join(leftover)} (\"auto\" is supported for batch size, "
                          "accumulation, clipping, precision, optimizer lr/weight_decay/torch_adam, "
                          "WarmupCosineLR params and ZeRO bucket sizes)")
    return ds


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == AUTO else []
