"""Typed configuration: one schema for every command, loaded from YAML plus dotted overrides.

A run's fully resolved config is written to ``RUN/config.yaml``; loading that file again (with
overrides such as ``scaling.num_workers=1 train.max_steps=200``) continues the run.

Errors name the file and the dotted key, e.g.::

    configs/tiny.yaml: train.lr: Input should be a valid number (got 'fast')
    configs/tiny.yaml: train.learning_rate: unknown key (known: lr, min_lr_ratio, ...)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


from llara_dist.errors import ConfigError  # noqa: E402  (re-exported)


class _Section(BaseModel):
    # extra="forbid": a misspelt key must fail loudly instead of silently keeping the default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrepareConfig(_Section):
    """`llara-dist prepare`: raw interactions -> seeded samples -> WebDataset shards."""

    format: Literal["synthetic", "recbole", "grouplens", "parquet", "csv"] = "synthetic"
    input: str | None = None  # directory for recbole/grouplens; a file or directory of files for parquet/csv
    out: str = "shards/synthetic"
    users: int = Field(600, ge=1)  # synthetic only
    items: int = Field(400, ge=2)  # synthetic only
    history_len: int = Field(10, ge=1)
    min_history: int = Field(3, ge=1)
    num_candidates: int = Field(20, ge=2)
    samples_per_shard: int = Field(2000, ge=1)
    drop_unknown: bool = False
    # Column names. recbole: overrides of the detected ones (item_id / product_id / artist_id, ...,
    # movie_title / title / app_name / name; user_id; timestamp). parquet/csv: the column mapping
    # (default user_id, item_id, timestamp, title).
    user_field: str | None = None
    item_field: str | None = None
    time_field: str | None = None
    title_field: str | None = None
    dedup: Literal["none", "consecutive", "all"] = "none"  # collapse repeats in each user's sequence
    negatives: Literal["unseen", "any"] = "unseen"  # may a history item be a negative candidate?
    compression: Literal["none", "gzip"] = "none"  # gzip: .tar.gz shards (WebDataset reads them as is)
    workers: int = Field(1, ge=1)  # local engine: processes writing shards (output identical for any value)
    engine: Literal["local", "ray", "auto"] = "auto"  # auto: ray when connected to a multi-node cluster
    # Where the on-disk sort spills (the log by user, the samples by order; ~16 bytes per interaction
    # plus ~(20 + 4 x history_len) bytes per sample, freed as shards are written). Default: $TMPDIR.
    tmp_dir: str | None = None
    domain: Literal["movie", "game", "artist"] | None = None  # default: from the source
    seed: int = 0  # fixes the synthetic data and the valid/test candidates


class DataConfig(_Section):
    """How training and evaluation read prepared shards."""

    shards: str = "shards/synthetic"
    shuffle_buffer: int = Field(1000, ge=1)
    # The stream's fixed order parallelism: world sizes dividing it read 1/world of the shard bytes
    # per rank (docs/data.md). 192 = 2^6 x 3; e.g. 768 for 128 or 256 ranks. Part of the resume state.
    canonical_ranges: int = Field(192, ge=1)
    skip_corrupt: bool = False
    max_length: int = Field(1024, ge=16)  # token budget per prompt (+answer)
    domain: Literal["movie", "game", "artist"] | None = None  # default: from meta.json


class RecConfig(_Section):
    """`llara-dist train-rec`: the conventional sequential recommender whose table is frozen."""

    model: Literal["sasrec", "gru4rec", "caser"] = "sasrec"
    out: str = "runs/rec"
    hidden_size: int = Field(64, ge=1)
    epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1)  # epochs without valid improvement before stopping
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    loss: Literal["ce", "bce"] = "ce"
    num_blocks: int = Field(2, ge=1)  # SASRec
    num_heads: int = Field(1, ge=1)  # SASRec
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


class TinyModelConfig(_Section):
    """Shape of the randomly initialised local Llama used by tests and the demo."""

    hidden_size: int = Field(64, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int | None = None
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(2048, ge=64)  # size of the locally trained tokenizer
    max_position_embeddings: int = Field(2048, ge=64)
    seed: int = 0  # fixes the random base weights: every rebuild (worker, resume, eval) is identical


class ModelConfig(_Section):
    name_or_path: str = "tiny"  # "tiny" or a local Hugging Face model directory
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    projector_hidden: int | None = None  # default: the LLM's hidden size
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    # Load a local checkpoint straight into ZeRO-3 partitions (deepspeed.zero.Init) so no rank ever
    # holds the whole model; needs a stage-3 ds_config. The tiny preset is always built whole.
    zero_init: bool = False
    # Build the architecture in name_or_path's config.json with random weights instead of loading
    # them: throughput and memory do not depend on the values (benchmarks, capacity planning before
    # the weights are at hand). The tokenizer still comes from the directory.
    random_init: bool = False


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


_CURRICULUM = re.compile(r"^(linear|hybrid_only|text_only|two_stage\((\d+)\))$")


def parse_curriculum(spec: str) -> tuple[str, int]:
    """``train.curriculum`` -> (kind, stage_steps): the one grammar (used by `train/curriculum.py`)."""
    m = _CURRICULUM.match(spec)
    if not m:
        raise ValueError(f"expected linear | hybrid_only | text_only | two_stage(k), got {spec!r}")
    return ("two_stage", int(m.group(2))) if m.group(2) is not None else (m.group(1), 0)


class TrainConfig(_Section):
    rec_dir: str = "runs/rec"  # output of `llara-dist train-rec`
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(8e-4, gt=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # paper: warm-up from and decay to lr/100
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    epochs: int = Field(5, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    curriculum: str = "linear"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(3, ge=1)
    ds_config: str = "ds_configs/zero3.json"
    # torch: torch.optim.AdamW through DeepSpeed (fused kernel on CUDA), nothing to compile.
    # deepspeed: DeepSpeed's own FusedAdam (GPU) / DeepSpeedCPUAdam (optimizer offload), JIT-compiled
    # at start-up: needs nvcc and CUDA_HOME (GPU) or a C++ toolchain (offload).
    optimizer: Literal["torch", "deepspeed"] = "torch"
    valid_every: int | None = Field(None, ge=1)
    valid_samples: int = Field(64, ge=1)
    seed: int = 42
    # End this invocation at this global step (checkpointed there) without changing the schedule,
    # e.g. to fit a time-sliced allocation; running the same command again continues the run.
    stop_after_steps: int | None = Field(None, ge=1)

    @field_validator("curriculum")
    @classmethod
    def _check_curriculum(cls, v: str) -> str:
        parse_curriculum(v)
        return v


class ScalingSection(_Section):
    # An int, or [min, max] for Ray Train's elastic scaling.
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = {"CPU": 1.0}
    max_failures: int = Field(0, ge=-1)
    elastic_resize_monitor_interval_s: float = Field(60.0, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _check_workers(cls, v):
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 1 or hi < lo:
            raise ValueError(f"expected a positive int or [min, max] with 1 <= min <= max, got {v!r}")
        return v


class RaySection(_Section):
    address: str | None = None  # None: $RAY_ADDRESS if set, else a local cluster; "auto": connect
    # Where Ray Train keeps the checkpoints: STORAGE_PATH/NAME/step_NNNNNNNN/. Default: RUN_DIR with
    # name "checkpoints" (RUN_DIR/checkpoints). On a multi-node cluster use a path every node sees
    # (NFS) or a cloud URI (s3://...); the name then defaults to RUN_DIR's basename.
    storage_path: str | None = None
    name: str | None = None


class EvalConfig(_Section):
    split: Literal["test", "valid"] = "test"
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(2, ge=1)
    prompt: Literal["hybrid", "text"] = "hybrid"
    decoding: Literal["free", "constrained", "score"] = "free"
    max_new_tokens: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1)
    # score decoding: rank by the mean instead of the sum of the title's token log-probabilities
    # (the sum favours short titles; the mean favours titles whose later tokens are predictable).
    length_norm: bool = False


class PretrainConfig(_Section):
    """`llara-dist pretrain-base`: full-parameter causal-LM training of the tiny preset on the train
    split's text-only prompts + answers, saved as a local Hugging Face checkpoint (a CPU stand-in
    for a pretrained LLM that already reads and writes the catalogue's titles)."""

    out: str = "runs/warm_base"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0


class Config(_Section):
    run_dir: str = "runs/tiny"
    prepare: PrepareConfig = PrepareConfig()
    data: DataConfig = DataConfig()
    rec: RecConfig = RecConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSection = ScalingSection()
    ray: RaySection = RaySection()
    eval: EvalConfig = EvalConfig()
    pretrain: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.model.tiny.hidden_size % self.model.tiny.num_attention_heads:
            raise ValueError("model.tiny.hidden_size must be divisible by model.tiny.num_attention_heads")
        return self


# ----------------------------------------------------------------------------------------------
# Loading


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: cannot set a key below {k!r}, which is a value")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "scaling.num_workers=[1,2]"]`` -> dotted keys and YAML-parsed values."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.lr=1e-4")
        parsed.append((key, yaml.safe_load(raw) if raw != "" else None))
    return parsed


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            known = _known_keys(parent)
            lines.append(f"{source}: {loc}: unknown key" + (f" (known: {', '.join(known)})" if known else ""))
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: {loc or '<top>'}: {e['msg']}{got_s}")
    return "\n".join(lines)


def _known_keys(path: tuple) -> list[str]:
    model: Any = Config
    for p in path:
        field = model.model_fields.get(str(p)) if hasattr(model, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None = all defaults), apply dotted overrides, validate."""
    tree: dict = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value, f"{source} (override {key}=...)")
    if overrides:
        source = f"{source} + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def worker_range(cfg: Config) -> tuple[int, int]:
    """(min, max) workers: equal for a fixed-size run."""
    n = cfg.scaling.num_workers
    return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))
