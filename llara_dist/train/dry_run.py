"""`llara-dist train --dry-run`: everything about a run that can be checked without starting a
worker or loading a weight, for the config's own target (``scaling.use_gpu: true`` is checked as
a GPU run on any machine).

Checks, in order (the first failure raises a `ConfigError` / `DataError` naming the file and key):

1. the driver's preflight: shards, item table vs shards, model directory, the filled DeepSpeed
   config at both ends of the worker range (YAML and template agree), a resumed run's data;
2. the tokenizer loads and every placeholder is one token;
3. for a sample of train samples, built into prompts by the real prompt builder and
   `TrainCollator` in both prompt modes, the answer's tokens occur verbatim in the prompt (the
   model can only learn to copy a candidate whose tokens it has seen);
4. the LoRA target modules exist in the architecture, built from ``config.json`` on the ``meta``
   device (shapes only: a 7B skeleton takes a second and no memory).

The plan printed with them: world size, effective batch, steps, warm-up, curriculum, and a
per-GPU memory estimate of the model states under the template's ZeRO stage.

`cheap_checks` (2-4) also runs at the start of every real run (`driver.preflight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llara_dist.config import Config, worker_range
from llara_dist.errors import ConfigError, DataError

ANSWER_SAMPLES = 32  # train samples whose answer-in-prompt property is checked
_GIB = 1024 ** 3


@dataclass
class ParamCounts:
    """Parameter counts of base + LoRA + projector, from the architecture alone."""

    architecture: str
    base: int  # frozen base LM, after the embedding rows for the added tokens
    lora: int
    projector: int
    largest_layer: int  # the largest single module's own parameters (ZeRO-3 gathers one at a time)
    base_rows: int  # embedding rows in config.json
    rows: int  # embedding rows the run trains with (len(tokenizer) when larger)

    @property
    def trainable(self) -> int:
        return self.lora + self.projector


# ----------------------------------------------------------------------------------------------
# Checks


def check_tokenizer(cfg: Config, titles: list[str]):
    """The run's tokenizer (loaded exactly as the workers load it); each placeholder one token."""
    from llara_dist.data.prompts import SPECIAL_TOKENS
    from llara_dist.model.llara import load_tokenizer

    where = "model.name_or_path" if cfg.model.name_or_path == "tiny" else f"{cfg.model.name_or_path}"
    try:
        tokenizer = load_tokenizer(cfg.model, titles)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001  (any loader failure is a bad checkout: one line)
        raise ConfigError(f"model.name_or_path: the tokenizer in {where} does not load: "
                          f"{type(e).__name__}: {e}") from None
    for tok in SPECIAL_TOKENS:
        ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"model.name_or_path: the tokenizer in {where} splits the placeholder {tok!r} "
                              f"into {len(ids)} tokens {ids}; expected one (added as a special token)")
    return tokenizer


def check_answers(cfg: Config, tokenizer, titles: list[str], meta: dict, n: int = ANSWER_SAMPLES) -> int:
    """For up to ``n`` train samples: the answer's label tokens are a contiguous run of the prompt's
    tokens, in both prompt modes. Returns the number of prompts checked."""
    from llara_dist.data.collate import IGNORE_INDEX, TrainCollator
    from llara_dist.data.prompts import build_prompt
    from llara_dist.data.samples import train_candidates
    from llara_dist.data.shards import read_split

    domain = cfg.data.domain or meta["domain"]
    samples = []
    for s in read_split(cfg.data.shards, "train"):
        s["candidates"] = train_candidates(s, meta["n_items"], meta["num_candidates"], cfg.train.seed, 0)
        samples.append(s)
        if len(samples) >= n:
            break
    collator = TrainCollator(tokenizer, cfg.data.max_length)
    checked = 0
    for mode in ("hybrid", "text"):
        prompts = [build_prompt(s, titles, mode=mode, domain=domain, seed=cfg.train.seed) for s in samples]
        batch = collator(prompts)
        for p, ids, labels in zip(prompts, batch["input_ids"].tolist(), batch["labels"].tolist()):
            answer_at = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
            answer = [labels[i] for i in answer_at][:-1]  # the last label is EOS
            prompt = ids[:answer_at[0]]
            if not answer or not _contains(prompt, answer):
                raise DataError(
                    f"{cfg.data.shards}: sample {p.key!r} ({mode} prompt): the answer {p.answer!r} encodes as "
                    f"{answer} but those tokens do not occur in the prompt, so the model cannot copy the "
                    f"candidate (model.name_or_path {cfg.model.name_or_path}: tokenizer splits words differently "
                    "after ', ' than after 'Answer: ')")
            checked += 1
    return checked


def _contains(seq: list[int], sub: list[int]) -> bool:
    k = len(sub)
    return any(seq[i:i + k] == sub for i in range(len(seq) - k + 1))


def count_params(cfg: Config, tokenizer, rec_dim: int) -> ParamCounts:
    """Build base + LoRA + projector on the ``meta`` device (no weights, no memory) and count; a
    LoRA target that matches no module fails here as it would in every worker."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from llara_dist.model.llara import Projector

    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.name_or_path == "tiny":
        from llara_dist.model.tiny import tiny_llama_config

        config = tiny_llama_config(cfg.model.tiny, tokenizer, min(tokenizer.vocab_size, len(tokenizer)))
        source = "model.tiny"
    else:
        path = Path(cfg.model.name_or_path)
        source = str(path / "config.json")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{source}: not a readable model config: {type(e).__name__}: {e}") from None
    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except Exception as e:  # noqa: BLE001  (an architecture transformers cannot build)
            raise ConfigError(f"{source}: cannot build the architecture: {type(e).__name__}: {e}") from None
        base_rows = int(base.get_input_embeddings().weight.shape[0])
        rows = max(base_rows, len(tokenizer))
        if rows > base_rows:
            base.resize_token_embeddings(rows, mean_resizing=False)
        base.requires_grad_(False)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in base.modules())
        n_base = sum(p.numel() for p in base.parameters())
        d_model = base.config.get_text_config().hidden_size
        # PEFT refuses only a list of which *no* entry matches; a misspelt entry next to good ones
        # would silently leave those layers without adapters. Each entry must name a module (PEFT's
        # rule for a list: the full name or its last dotted parts).
        names = [n for n, _ in base.named_modules() if n]
        missing = [k for k in cfg.lora.target_modules if not any(n == k or n.endswith("." + k) for n in names)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules: {', '.join(missing)} not found in {source} "
                              f"({type(base).__name__}; its Linear modules: {', '.join(linear)})")
        lora = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                              target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none")
        try:
            lm = get_peft_model(base, lora, autocast_adapter_dtype=False)
        except ValueError as e:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules: {list(cfg.lora.target_modules)} do not all exist in "
                              f"{source} ({type(base).__name__}): {e} (its Linear modules: {', '.join(linear)})"
                              ) from None
        n_lora = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        projector = Projector(rec_dim, d_model, cfg.model.projector_hidden)
        n_proj = sum(p.numel() for p in projector.parameters())
    return ParamCounts(type(base).__name__, n_base, n_lora, n_proj, largest, base_rows, rows)


def cheap_checks(cfg: Config, meta: dict, rec_dim: int) -> tuple[int, ParamCounts]:
    """Checks 2-4 (seconds, no weights): returns prompts checked and the parameter counts."""
    from llara_dist.data.shards import load_titles

    titles = load_titles(cfg.data.shards)
    tokenizer = check_tokenizer(cfg, titles)
    checked = check_answers(cfg, tokenizer, titles, meta)
    return checked, count_params(cfg, tokenizer, rec_dim)


# ----------------------------------------------------------------------------------------------
# Memory


def memory_estimate(counts: ParamCounts, ds_config: dict, world: int, dtype: str) -> dict[str, float]:
    """Bytes per GPU and host bytes per node for the model states (no activations).

    DeepSpeed's estimators assume every parameter trains; here only LoRA + projector do. So they
    are applied to the trainable parameters (16-bit copy, fp32 master, Adam moments, gradients,
    sharded by the stage), and the frozen base is added as plain weights: sharded across ranks
    under ZeRO-3 (and off the GPU with parameter offload), a whole copy on every GPU otherwise.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    off_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    off_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    width = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.trainable, counts.largest_layer, num_gpus_per_node=world, cpu_offload=off_opt,
            cpu_offload_params=off_par, zero_init=True)
        # The estimator's largest-layer buffer is fp32 (4 bytes); ours gathers in the base dtype.
        base_gpu = 0 if off_par else counts.base * width / world
        base_cpu = counts.base * width if off_par else 0
        gather = counts.largest_layer * width
        gpu = gpu - 4 * counts.largest_layer + gather
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(counts.trainable, num_gpus_per_node=world,
                                                         cpu_offload=off_opt)
        base_gpu, base_cpu, gather = counts.base * width, 0, 0
    return {"stage": stage, "frozen_base": base_gpu, "trainable_states": gpu - gather, "gather": gather,
            "gpu_total": base_gpu + gpu, "host": cpu + base_cpu, "offload": off_opt or off_par}


# ----------------------------------------------------------------------------------------------
# The dry run


def dry_run(cfg: Config) -> str:
    """Run every check; return the report (a table). Raises on the first failure."""
    from llara_dist.train.driver import preflight
    from llara_dist.train.ds_config import build_ds_config

    plan, table, rec_meta = preflight(cfg)  # checks 1-4, exactly as every real run starts
    checked, counts = plan.checks["prompts"], plan.checks["counts"]
    lo, hi = worker_range(cfg)
    ds = build_ds_config(cfg, world_size=hi, total_steps=plan.total_steps, hidden_size=plan.hidden_size)
    mem = memory_estimate(counts, ds, hi, cfg.model.dtype)
    t = cfg.train
    world = str(hi) if lo == hi else f"{lo}-{hi} (elastic; steps counted at {hi})"
    target = "GPU (nccl)" if cfg.scaling.use_gpu else "CPU (gloo)"
    warm = max(1, t.warmup_steps) if "scheduler" in ds else 0
    rows = [
        ("checks", ""),
        ("  shards", f"{cfg.data.shards}: {plan.n_train} train samples"),
        ("  item table", f"{cfg.train.rec_dir}: {table.shape[0]} x {table.shape[1]} ({rec_meta.get('model', '?')})"),
        ("  model", f"{cfg.model.name_or_path}: {counts.architecture}, hidden {plan.hidden_size}, "
                    f"{counts.base_rows} -> {counts.rows} embedding rows"),
        ("  DeepSpeed config", f"{cfg.train.ds_config}: ZeRO-{mem['stage']}, agrees with the YAML at "
                               f"{'/'.join(str(w) for w in sorted({lo, hi}))} worker(s)"),
        ("  tokenizer", "loads; [HistoryEmb] [CansEmb] [PH] are one token each"),
        ("  answers in prompts", f"{checked} prompts (hybrid + text): every answer's tokens occur in the prompt"),
        ("  LoRA targets", f"{', '.join(cfg.lora.target_modules)}: all found"),
        ("plan", ""),
        ("  target", f"{target}, {cfg.model.dtype}, train.optimizer {t.optimizer}"),
        ("  world size", world),
        ("  effective batch", f"{t.micro_batch_size} micro x {t.grad_accum} accum x {hi} = "
                              f"{t.micro_batch_size * t.grad_accum * hi} samples/step"),
        ("  steps", f"{plan.steps_per_epoch}/epoch, {plan.total_steps} total"
                    + (" (train.max_steps)" if t.max_steps else f" ({t.epochs} epochs)")),
        ("  warm-up", f"{warm} step(s), lr {t.lr:g} (warm-up from and cosine decay to lr x {t.min_lr_ratio:g})"),
        ("  curriculum", t.curriculum),
        ("  checkpoints", f"every {t.checkpoint_every} steps, keep {t.keep_last}, in {plan.storage_path}/{plan.name}"),
        ("parameters", ""),
        ("  frozen base", _count(counts.base)),
        ("  LoRA (r={})".format(cfg.lora.r), _count(counts.lora)),
        ("  projector", _count(counts.projector)),
        (f"memory per {'GPU' if cfg.scaling.use_gpu else 'worker'} (ZeRO-{mem['stage']}, {hi} ranks"
         f"{', offload' if mem['offload'] else ''})", ""),
        ("  frozen base weights", _gib(mem["frozen_base"])
         + (" (sharded)" if mem["stage"] == 3 else " (whole copy)")),
        ("  trainable states", _gib(mem["trainable_states"]) + " (16-bit + fp32 master + Adam + grads)"),
        *([("  ZeRO-3 gather buffer", _gib(mem["gather"]) + " (largest layer)")] if mem["stage"] == 3 else []),
        ("  model states total", _gib(mem["gpu_total"]) + " + activations"),
        ("  host RAM per node", _gib(mem["host"]) + " (DeepSpeed's estimate for the model states)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"llara-dist train --dry-run: all checks passed for {cfg.run_dir}"]
    lines += [f"{k:<{width}}  {v}".rstrip() for k, v in rows]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} B)" if n >= 1e8 else f"{n:,}"


def _gib(b: float) -> str:
    return f"{b / _GIB:.2f} GiB" if b >= _GIB / 10 else f"{b / 2 ** 20:.2f} MiB"

