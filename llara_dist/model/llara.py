"""The LLaRA model: a frozen causal LM with LoRA, plus a projector that turns frozen recommender
item embeddings into LM input embeddings at the `[HistoryEmb]` / `[CansEmb]` placeholders.

    item_table[batch_items] --projector--> rows --inject_embeddings(slots)--> inputs_embeds --LM--> logits

Only the LoRA weights and the projector train. The item table is an input tensor (it comes from
Ray's object store), never a parameter, so it is neither partitioned nor checkpointed.

ZeRO-3: the model is built as ordinary `nn.Module`s and partitioned later by
`deepspeed.initialize`; with ``model.zero_init: true`` and a stage-3 DeepSpeed config passed to
`build_model`, a local checkpoint is instead loaded straight into partitions (each rank holds
1/world of the weights from the start). Everything that reads weights outside a module's forward
(new-token rows, exports) gathers them with `deepspeed.zero.GatheredParameters`, which is a
collective: under ZeRO-3 call those functions on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from llara_dist.config import Config, LoraConfig, ModelConfig
from llara_dist.errors import CheckpointError, ConfigError
from llara_dist.model.generation import PrefixConstraint, all_ranks_done, greedy_generate, positions_from_mask
from llara_dist.model.hf_loading import load_causal_lm
from llara_dist.ops import inject_embeddings

EXPORT_FORMAT = "llara-dist-export"
EXPORT_SCHEMA_VERSION = 1
LLARA_CONFIG_NAME = "llara_config.json"
PROJECTOR_NAME = "projector.safetensors"
SPECIAL_ROWS_NAME = "special_tokens.safetensors"
ADAPTER_DIR = "adapter"
TINY_BASE_DIR = "base"  # the tiny preset's base weights travel with its export (they are small)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def _model_dir(model_cfg: ModelConfig) -> Path:
    """The local checkpoint directory of ``model.name_or_path`` (never a hub download)."""
    path = Path(model_cfg.name_or_path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.name_or_path: {str(path)!r} does not exist; expected 'tiny' or a local Hugging Face "
            "model directory (config.json, weights, tokenizer files)"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {path} has no config.json; expected a Hugging Face model directory")
    return path


def load_tokenizer(model_cfg: ModelConfig, titles: Sequence[str]) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model_cfg`` with the LLaRA special tokens and a pad token added.

    ``tiny``: a tokenizer trained locally on the item titles (deterministic); otherwise the local
    checkpoint's own tokenizer.
    """
    from llara_dist.data.tokenizer import build_tiny_tokenizer, prepare_tokenizer

    if model_cfg.name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer(list(titles), model_cfg.tiny.vocab_size)
    else:
        path = _model_dir(model_cfg)
        _check_tokenizer_files(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prepare_tokenizer(tokenizer)
    return tokenizer


def _check_tokenizer_files(path: Path) -> None:
    """A checkout with only a SentencePiece ``tokenizer.model`` (no ``tokenizer.json``) needs the
    sentencepiece package; without it transformers falls through to a misleading tiktoken error."""
    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        return
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None:
        raise ConfigError(f"model.name_or_path: {path / 'tokenizer.model'} is a SentencePiece model and the "
                          "checkout has no tokenizer.json; install sentencepiece to read it "
                          "(pip install sentencepiece protobuf)")


def _llara_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    from llara_dist.data.prompts import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_TOKEN

    ids = {}
    for tok in (HISTORY_TOKEN, CANDIDATE_TOKEN, TEXT_TOKEN):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ConfigError(f"tokenizer has no {tok!r} token: pass it through prepare_tokenizer() first")
        ids[tok] = int(i)
    return ids


# ----------------------------------------------------------------------------------------------
# ZeRO-3 helpers


def _is_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_id")


def _gathered(params: Iterable[Tensor], modifier_rank: int | None = None) -> contextlib.AbstractContextManager:
    """Full weights inside the block when ZeRO-3 partitioned them (a collective), else a no-op."""
    params = [p for p in params if _is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _full_shape(p: Tensor) -> torch.Size:
    return p.ds_shape if _is_partitioned(p) else p.shape


# ----------------------------------------------------------------------------------------------
# Base model and new-token rows


def _stable_seed(token: str) -> int:
    # crc32, not hash(): Python salts str hashes per process.
    return zlib.crc32(token.encode("utf-8"))


@torch.no_grad()
def _init_new_rows(weight: Tensor, n_trained: int, rows: dict[int, str]) -> None:
    """Each row ``i`` of ``rows`` := mean of the trained rows ``[:n_trained]`` + a small seeded
    perturbation, computed on the weight's own device and in its dtype.

    The mean keeps the new tokens' logits and embeddings in the old distribution; the seed per
    token string makes the rows identical on every rebuild, on every rank, in every process (the
    noise is drawn on the CPU, where a seeded generator gives the same numbers everywhere, then
    moved to the weight: a GPU or ``meta`` weight works alike).
    """
    old = weight[:n_trained].float()
    mean, std = old.mean(0), old.std(0)
    for i, tok in sorted(rows.items()):
        gen = torch.Generator().manual_seed(_stable_seed(tok))
        noise = torch.randn(weight.shape[1], generator=gen).to(weight.device)
        weight[i] = (mean + 0.1 * std * noise).to(weight.dtype)


def _load_base(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, ds_config: dict | None,
               device: str | torch.device | None = None) -> tuple[PreTrainedModel, int, list[int]]:
    """The frozen base LM with one embedding (and LM-head) row per token of ``tokenizer``, the
    number of rows the checkpoint came with, and the rows given fresh values."""
    dtype = getattr(torch, model_cfg.dtype)
    if model_cfg.name_or_path == "tiny":
        from llara_dist.model.tiny import build_tiny_llama

        # The tiny base gets a row per token of the tokenizer's own vocabulary (the locally built
        # one already holds the placeholders); tokens added on top of it later get their rows
        # through the same resize as a real checkpoint.
        n_base = min(tokenizer.vocab_size, len(tokenizer))
        base = build_tiny_llama(model_cfg.tiny, tokenizer, n_base, dtype, model_cfg.attn_implementation)
    else:
        path = _model_dir(model_cfg)
        kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
        if model_cfg.attn_implementation:
            kwargs["attn_implementation"] = model_cfg.attn_implementation
        hf_ds = None
        if ds_config is not None and model_cfg.zero_init and ds_config.get("zero_optimization", {}).get("stage") == 3:
            # While an HfDeepSpeedConfig is alive, from_pretrained builds under deepspeed.zero.Init
            # and loads each rank's partition only.
            from transformers.integrations import HfDeepSpeedConfig

            hf_ds = HfDeepSpeedConfig(ds_config)
        if device is not None and hf_ds is None:
            # Straight to the device: no host copy of the weights per worker (8 eval workers x a 7B
            # model loaded on the host first is ~108 GB of host RAM on one node).
            kwargs["device_map"] = str(device)
        base = None
        if model_cfg.random_init:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                base = _random_base(path, kwargs)
        elif device is not None and hf_ds is None and torch.device(device).type != "cpu":
            # Onto an accelerator tensor by tensor with pread, not through a memory map: the host holds
            # only the tensors in flight (None for non-safetensors checkpoints). On the CPU the mapped
            # file itself is the weights (one copy, page cache shared by the node's workers).
            base = load_causal_lm(path, dtype=dtype, device=device,
                                  attn_implementation=model_cfg.attn_implementation)
        if base is None:
            base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        base._llara_hf_ds_config = hf_ds  # keep it alive: transformers holds only a weak reference
    base_vocab_size, rows_set = _add_token_rows(base, tokenizer)
    base.config.pad_token_id = tokenizer.pad_token_id
    return base, base_vocab_size, rows_set


def _random_base(path: Path, kwargs: dict[str, Any]) -> PreTrainedModel:
    """The architecture of ``path/config.json`` with random weights (``model.random_init``).

    Built on the current default device (``with torch.device("cuda"):`` initialises a 7B model in
    seconds; on the CPU it takes minutes) and, under a live ZeRO-3 config, straight into partitions.
    Seeded, so every rank draws the same weights.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs = {k: v for k, v in kwargs.items() if k != "local_files_only"}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _rows_to_set(tokenizer: PreTrainedTokenizerBase, old_n: int) -> dict[int, str]:
    """Rows that hold no trained embedding for a token of ``tokenizer``: every row added beyond the
    checkpoint's ``old_n``, and the rows of the tokens LLaRA added (placeholders, a pad of its own)
    that fall on a checkpoint's spare rows (Qwen2.5 ships 152,064 rows for a smaller tokenizer:
    those rows exist but were never trained)."""
    from llara_dist.data.prompts import SPECIAL_TOKENS
    from llara_dist.data.tokenizer import PAD

    ours = [*SPECIAL_TOKENS, *([PAD] if tokenizer.pad_token == PAD else [])]
    rows = {int(tokenizer.convert_tokens_to_ids(t)): t for t in ours}
    # Below vocab_size a token is part of the tokenizer's own trained vocabulary (the tiny preset
    # trains its placeholders in), so its row is the checkpoint's.
    rows = {i: t for i, t in rows.items() if i >= tokenizer.vocab_size}
    new_n = len(tokenizer)
    rows.update({i: t for i, t in zip(range(old_n, new_n), tokenizer.convert_ids_to_tokens(list(range(old_n, new_n))))})
    return rows


def _add_token_rows(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, list[int]]:
    """Grow the embeddings to the tokenizer if needed and give every row without a trained value
    deterministic values; returns the number of rows the checkpoint had and the rows set."""
    emb = base.get_input_embeddings()
    old_n = int(_full_shape(emb.weight)[0])
    new_n = len(tokenizer)
    if new_n > old_n:
        # transformers gathers/re-partitions ZeRO-3 weights itself during the resize.
        base.resize_token_embeddings(new_n, mean_resizing=False)
    rows = _rows_to_set(tokenizer, old_n)
    if not rows:
        return old_n, []
    # The mean and spread come from the tokenizer's trained vocabulary, not from spare rows.
    n_trained = min(old_n, tokenizer.vocab_size)
    weights = [base.get_input_embeddings().weight]
    head = base.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    with _gathered(weights, modifier_rank=0):
        for w in weights:
            _init_new_rows(w, n_trained, rows)
    return old_n, sorted(rows)


# ----------------------------------------------------------------------------------------------
# The model


class Projector(nn.Sequential):
    """Recommender embedding (d_rec) -> LM embedding (d_model): Linear -> GELU -> Linear."""

    def __init__(self, d_rec: int, d_model: int, hidden: int | None = None):
        hidden = hidden or d_model
        super().__init__(nn.Linear(d_rec, hidden), nn.GELU(), nn.Linear(hidden, d_model))


def as_item_table(table: Tensor | np.ndarray) -> Tensor:
    """A tensor view of the frozen item table (a read-only numpy array from Ray's object store)."""
    if isinstance(table, np.ndarray):
        with warnings.catch_warnings():
            # Read-only is fine: the table is only ever indexed, never written.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return torch.from_numpy(table)
    return table


class LlaraModel(nn.Module):
    """LoRA-wrapped causal LM (``self.lm``, a `peft.PeftModel`) plus the item ``projector``.

    ``self.lm`` is a regular Hugging Face causal LM: it accepts ``inputs_embeds``,
    ``attention_mask``, ``position_ids``, ``past_key_values`` and returns ``.logits``; evaluation
    code may drive it directly with embeddings from :meth:`embed`.
    """

    def __init__(self, lm: nn.Module, projector: Projector, meta: dict[str, Any]):
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.meta = meta  # what an export records: model/lora settings, dims, token ids

    @property
    def pad_token_id(self) -> int:
        return int(self.meta["pad_token_id"])

    # -- embeddings ------------------------------------------------------------------------

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Plain token embeddings (works on ZeRO-3 partitioned weights: the module hook gathers)."""
        return self.lm.get_input_embeddings()(input_ids)

    def project_items(self, batch_items: Tensor, item_table: Tensor | np.ndarray) -> Tensor:
        """Projected rows ``[N, d_model]`` of the batch's distinct items (only those, not the table)."""
        table = as_item_table(item_table)
        feats = table.index_select(0, batch_items.to(table.device, torch.long))
        first = self.projector[0].weight
        return self.projector(feats.to(first.device, first.dtype))

    def embed(self, input_ids: Tensor, slots: Tensor, batch_items: Tensor, item_table: Tensor | np.ndarray) -> Tensor:
        """``inputs_embeds [B, L, D]``: token embeddings with projected items at the placeholders.

        A text batch (``batch_items`` empty) injects nothing and never touches the projector.
        """
        embeds = self.embed_tokens(input_ids)
        if batch_items.numel() == 0:
            return embeds
        rows = self.project_items(batch_items, item_table).to(embeds.dtype)
        return inject_embeddings(embeds, slots.to(embeds.device), rows)

    # -- training --------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor, slots: Tensor, batch_items: Tensor,
                item_table: Tensor | np.ndarray, labels: Tensor | None = None,
                num_items_in_batch: int | None = None) -> CausalLMOutputWithPast:
        """Logits, and with labels the next-token loss over ``labels != -100``: their mean, or their
        sum divided by ``num_items_in_batch`` (the answer tokens of a whole distributed batch)."""
        embeds = self.embed(input_ids, slots, batch_items, item_table)
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask,
                        position_ids=positions_from_mask(attention_mask), labels=labels, use_cache=False, **extra)

    def lm_logits(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, L, V]`` of the LM for ready-made embeddings (any padding side)."""
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        position_ids=positions_from_mask(attention_mask), use_cache=False).logits

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, slots: Tensor, batch_items: Tensor,
                 item_table: Tensor | np.ndarray, max_new_tokens: int, stop_token_ids: Sequence[int],
                 constraints: Sequence[PrefixConstraint] | None = None,
                 sync_ranks: bool | None = None) -> list[list[int]]:
        """Greedy decoding from the injected prompt embeddings (left-padded ``[B, L]``).

        Returns each row's new tokens, without the stop token. Uses the KV cache and per-row
        positions, so a row decodes the same alone or in any batch. ``constraints`` (one per row,
        e.g. evaluation's candidate-title trie) restrict each step to the row's allowed tokens and
        stop the row once its answer is complete. ``sync_ranks`` (default: on when the weights are
        ZeRO-3 partitioned over several ranks) keeps stepping until every rank is done, because
        each forward is then a collective. The loop is
        :func:`llara_dist.model.generation.greedy_generate`.
        """
        if sync_ranks is None:
            sync_ranks = (_is_partitioned(self.projector[0].weight) and torch.distributed.is_initialized()
                          and torch.distributed.get_world_size() > 1)
        all_done = functools.partial(all_ranks_done, device=input_ids.device) if sync_ranks else None
        embeds = self.embed(input_ids, slots, batch_items, item_table)
        return greedy_generate(self.lm, embeds, attention_mask, max_new_tokens=max_new_tokens,
                               stop_ids=stop_token_ids, pad_id=self.pad_token_id, constraints=constraints,
                               all_done=all_done)


# ----------------------------------------------------------------------------------------------
# Building


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, rec_dim: int,
                ds_config: dict | None = None, device: str | torch.device | None = None) -> LlaraModel:
    """Base LM + deterministic new-token rows + LoRA + projector; only LoRA and projector train.

    Every random initialisation is seeded (tiny base: ``model.tiny.seed``; LoRA and projector:
    ``train.seed``), so all ranks build identical models without a broadcast. ``ds_config`` (the
    DeepSpeed config dict) matters only with ``model.zero_init: true`` and ZeRO stage 3: the local
    checkpoint is then loaded directly into partitions.
    """
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    base, base_vocab_size, rows_set = _load_base(cfg.model, tokenizer, ds_config, device)
    base.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (our inputs are embeddings).
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    d_model = base.config.get_text_config().hidden_size

    lora = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        try:
            # LoRA in the base's dtype, not PEFT's default fp32: DeepSpeed needs every trainable weight
            # in one dtype (ZeRO-3 with zero_init skips its own cast and asserts on a mix), and its
            # bf16/fp16 optimizers keep the fp32 master copy themselves (exports read that copy).
            lm = get_peft_model(base, lora, autocast_adapter_dtype=False)
        except ValueError as e:  # e.g. no module matches target_modules
            raise ConfigError(f"lora.target_modules: {e}") from None
        projector = Projector(rec_dim, d_model, cfg.model.projector_hidden).to(base.dtype)
        if device is not None:
            projector = projector.to(device)

    meta = {
        "model": cfg.model.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "rec_dim": int(rec_dim),
        "d_model": int(d_model),
        "projector_hidden": int(cfg.model.projector_hidden or d_model),
        "vocab_size": len(tokenizer),
        "base_vocab_size": base_vocab_size,  # rows the checkpoint came with
        "initialized_rows": rows_set,  # rows given mean + noise values (new or spare rows)
        "special_token_ids": _llara_token_ids(tokenizer),
        "pad_token_id": int(tokenizer.pad_token_id),
        "eos_token_id": int(tokenizer.eos_token_id),
    }
    # Training mode from the start: from_pretrained returns eval mode, which silently disables
    # gradient checkpointing and LoRA dropout until something calls .train() (load_export and
    # evaluation switch to eval mode themselves).
    return LlaraModel(lm, projector, meta).train()


def trainable_parameters(model: LlaraModel) -> Iterator[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that train: LoRA A/B matrices and the projector."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# Export


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DeepSpeed engine / torch.compile wrappers
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _clean_base_name(name: str) -> str:
    """PEFT-wrapped base parameter name -> the plain Hugging Face name."""
    return name.replace(".base_layer.", ".")


def _frozen_base_params(model: LlaraModel) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.lm.get_base_model().named_parameters():
        if "lora_" not in name:
            yield _clean_base_name(name), p


def _special_rows(model: LlaraModel) -> dict[str, Tensor]:
    """Embedding and LM-head rows of the LLaRA tokens, pad and every row added to the checkpoint."""
    added = range(model.meta["base_vocab_size"], model.meta["vocab_size"])
    ids = sorted({*model.meta["special_token_ids"].values(), model.meta["pad_token_id"], *added,
                  *model.meta.get("initialized_rows", [])})
    base = model.lm.get_base_model()
    tensors = {"token_ids": torch.tensor(ids, dtype=torch.long)}
    named = {"input_rows": base.get_input_embeddings().weight}
    head = base.get_output_embeddings()
    if head is not None:
        named["output_rows"] = head.weight
    for key, w in named.items():
        with _gathered([w]):
            tensors[key] = w.detach()[ids].to("cpu", copy=True).contiguous()
    return tensors


def _fp32_master(p: Tensor) -> Tensor | None:
    """The optimizer's full fp32 master copy of a bf16/fp16 trainable weight, where DeepSpeed keeps
    one (None otherwise). Exports read it: the half-precision copy has lost the small updates that
    the master copy still holds. Under ZeRO-3 this is a collective."""
    if p.dtype == torch.float32 or not p.requires_grad:
        return None
    try:
        from deepspeed.utils import safe_get_full_fp32_param
    except ImportError:
        return None
    return safe_get_full_fp32_param(p)


def _trained_state(model: LlaraModel) -> dict[str, Tensor]:
    """Full CPU copies of the trainable tensors, from the fp32 master copy where DeepSpeed keeps one
    (collective under ZeRO-3: each tensor is gathered from its partitions, one at a time, so never
    more than one full LoRA matrix is held)."""
    state = {}
    for name, p in trainable_parameters(model):
        master = _fp32_master(p)
        if master is not None:
            state[name] = master.detach().to("cpu", copy=True)
            continue
        with _gathered([p]):
            state[name] = p.detach().to("cpu", copy=True)
    return state


def _checked_state(model: LlaraModel, state: dict[str, Tensor]) -> dict[str, Tensor]:
    state = {_strip_prefix(k): v for k, v in state.items()}
    expected = dict(trainable_parameters(model))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"export state: {len(missing)} trainable tensors missing, e.g. {missing[:3]}")
    for name, p in expected.items():
        if tuple(state[name].shape) != tuple(_full_shape(p)):
            # The classic ZeRO-3 trap: an ungathered partition saves as Size([0]).
            raise CheckpointError(f"export state: {name} has shape {tuple(state[name].shape)}, "
                                  f"expected {tuple(_full_shape(p))} (was it gathered from ZeRO-3 partitions?)")
    return state


def write_export(model: LlaraModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, *,
                 state: dict[str, Tensor] | None = None, extra_config: dict[str, Any] | None = None) -> Path:
    """Write the self-contained export that :func:`load_export` reads; the one exporter (the end of
    training, ``RUN/best``, an export made from a DeepSpeed checkpoint).

    Layout: ``adapter/`` (saved by PEFT's own ``save_pretrained``, so plain
    ``PeftModel.from_pretrained(base, out_dir / "adapter")`` loads it), ``projector.safetensors``,
    ``special_tokens.safetensors`` (the rows given fresh values: LLaRA's tokens, pad, added or
    spare rows), ``llara_config.json`` (+ ``extra_config``), tokenizer files, and for the tiny
    preset ``base/`` (its random base weights).

    The trainable tensors come from ``state`` when given (full-size tensors named as in
    :func:`trainable_parameters`, a ``module.`` prefix accepted, e.g. from
    ``zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(..., exclude_frozen_parameters=True)``),
    else from ``model`` itself, read from DeepSpeed's fp32 master copy under bf16/fp16 training.
    Collective under ZeRO-3 (the frozen rows are gathered too): call it on every rank; rank 0
    writes into a sibling ``.tmp`` directory renamed into place, so ``out_dir`` is always a whole
    export, and the other ranks wait for it when a process group is up.
    """
    import os
    import shutil

    out = Path(out_dir)
    state = _checked_state(model, _trained_state(model) if state is None else state)
    special = _special_rows(model)
    tiny = model.meta["model"]["name_or_path"] == "tiny"
    base_state: dict[str, Tensor] = {}
    if tiny:
        for name, p in _frozen_base_params(model):
            with _gathered([p]):
                base_state[name] = p.detach().to("cpu", copy=True).contiguous()
    config = {"format": EXPORT_FORMAT, "schema_version": EXPORT_SCHEMA_VERSION, **model.meta}
    clash = sorted(set(extra_config or {}) & set(config))
    if clash:
        raise ValueError(f"write_export: extra_config keys {clash} would overwrite the model's own keys")
    config.update(extra_config or {})

    if _rank() == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lora_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
        model.lm.save_pretrained(tmp / ADAPTER_DIR, state_dict=lora_state, save_embedding_layers=False)
        projector = {k[len("projector."):]: v.contiguous() for k, v in state.items() if k.startswith("projector.")}
        save_file(projector, tmp / PROJECTOR_NAME, metadata={"format": "pt"})
        save_file(special, tmp / SPECIAL_ROWS_NAME, metadata={"format": "pt"})
        if tiny:
            (tmp / TINY_BASE_DIR).mkdir()
            model.lm.get_base_model().config.save_pretrained(tmp / TINY_BASE_DIR)
            save_file(base_state, tmp / TINY_BASE_DIR / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / LLARA_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        old = out.with_name(out.name + ".old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: missing ({what}); is this a directory written by write_export?")
    return path


def load_export(out_dir: str | Path, *, name_or_path: str | None = None, dtype: str | None = None,
                device: str | torch.device = "cpu") -> tuple[LlaraModel, PreTrainedTokenizerBase, dict]:
    """Rebuild the exported model (in eval mode), its tokenizer and its ``llara_config.json``.

    ``name_or_path`` / ``dtype`` override the recorded base checkpoint path and dtype (e.g. the
    same Llama-2 checkout mounted elsewhere). Outputs equal the exported model's exactly.
    """
    from peft import set_peft_model_state_dict

    from llara_dist.data.tokenizer import prepare_tokenizer

    out = Path(out_dir)
    config_file = _require(out / LLARA_CONFIG_NAME, "the export's settings")
    try:
        llara = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON: {e}") from None
    if not isinstance(llara, dict) or llara.get("format") != EXPORT_FORMAT:
        got = llara.get("format") if isinstance(llara, dict) else type(llara).__name__
        raise CheckpointError(f"{config_file}: format is {got!r}, expected {EXPORT_FORMAT!r}")
    adapter_file = _require(out / ADAPTER_DIR / "adapter_model.safetensors", "LoRA weights")
    projector_file = _require(out / PROJECTOR_NAME, "projector weights")
    special_file = _require(out / SPECIAL_ROWS_NAME, "new-token embedding rows")
    model_cfg = dict(llara.get("model") or {})
    if name_or_path is not None:
        model_cfg["name_or_path"] = name_or_path
    if dtype is not None:
        model_cfg["dtype"] = dtype
    tiny = model_cfg.get("name_or_path", "tiny") == "tiny"
    base_file = _require(out / TINY_BASE_DIR / "model.safetensors", "tiny base weights") if tiny else None

    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prepare_tokenizer(tokenizer)
    try:
        cfg = Config(model=ModelConfig.model_validate(model_cfg), lora=LoraConfig.model_validate(llara["lora"]))
        rec_dim = int(llara["rec_dim"])
    except (ValidationError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: model/lora settings not usable by this version: {e}") from None
    # A checkpoint loads straight onto ``device``; the tiny preset is built on the host, where its
    # seeded weights are drawn (it is small), and moved.
    model = build_model(cfg, tokenizer, rec_dim, device=None if tiny else device)
    model_dtype = getattr(torch, cfg.model.dtype)

    with torch.no_grad():
        if base_file is not None:
            saved = load_file(base_file)
            for name, p in _frozen_base_params(model):
                p.copy_(saved[name])
        special = load_file(special_file)
        ids = special["token_ids"].tolist()
        base = model.lm.get_base_model()
        emb = base.get_input_embeddings().weight
        emb[ids] = special["input_rows"].to(emb.device, model_dtype)
        if "output_rows" in special and base.get_output_embeddings() is not None:
            head = base.get_output_embeddings().weight
            head[ids] = special["output_rows"].to(head.device, model_dtype)
        result = set_peft_model_state_dict(model.lm, load_file(adapter_file))
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        if bad:
            raise CheckpointError(f"{adapter_file}: tensors that match no LoRA layer, e.g. {bad[:3]}")
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise CheckpointError(f"{adapter_file}: {len(missing)} LoRA tensors missing, e.g. {missing[:3]}")
        model.projector.load_state_dict({k: v.to(model_dtype) for k, v in load_file(projector_file).items()})
    return model.to(device).eval(), tokenizer, llara
