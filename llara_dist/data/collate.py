"""Prompts -> tensors, with the placeholder slot map computed here on the CPU.

For every placeholder token the collator finds which item it stands for, and returns the batch's
distinct items (``batch_items``, sorted) and each placeholder's index into them (``slots``, -1
elsewhere; ``batch_items[slots]`` is the item at a placeholder), so the model gathers ``len(batch_items)`` table rows once and injects them with one
indexed op, without searching the token ids on the GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from llara_dist.data.prompts import CANDIDATE_TOKEN, HISTORY_TOKEN, TEXT_TOKEN, Prompt
from llara_dist.data.tokenizer import encode_answers
from llara_dist.errors import DataError

IGNORE_INDEX = -100


class _Collator:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (HISTORY_TOKEN, CANDIDATE_TOKEN, TEXT_TOKEN)]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("the tokenizer lacks the placeholder tokens; call prepare_tokenizer(tokenizer) first")
        self.history_id, self.candidate_id, self.text_id = ids
        self.truncated = 0  # prompts shortened to fit max_length (see _fit)
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.pad_id is None or self.eos_id is None:
            raise ValueError("the tokenizer needs pad and EOS tokens; call prepare_tokenizer(tokenizer) first")

    def _prompt_ids(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        # One batched call: fast tokenizers encode the batch in Rust.
        return self.tokenizer([p.text for p in prompts], add_special_tokens=True)["input_ids"]

    def _placeholders(self, prompt: Prompt, ids: list[int]) -> list[int]:
        """Item id per token (-1 where no item is injected), checked against the prompt's items."""
        marks = (self.history_id, self.candidate_id) if prompt.mode == "hybrid" else (self.text_id,)
        positions = [i for i, t in enumerate(ids) if t in marks]
        if len(positions) != len(prompt.item_ids):
            raise DataError(f"sample {prompt.key!r}: {len(positions)} placeholder tokens after tokenisation, "
                            f"expected {len(prompt.item_ids)} (does a title contain a placeholder?)")
        items = [-1] * len(ids)
        if prompt.mode == "hybrid":
            for pos, item in zip(positions, prompt.item_ids):
                items[pos] = item
        return items

    def _fit(self, prompt: Prompt, ids: list[int], extra: int) -> tuple[Prompt, list[int]]:
        """Make prompt + `extra` tokens fit `max_length` by leaving out the oldest history items.

        Cutting tokens instead would split placeholders from their titles or lose the answer. The
        (rare) shortened prompts are counted in `self.truncated`, with one warning.
        """
        if len(ids) + extra <= self.max_length:
            return prompt, ids
        for k in range(1, len(prompt.history_parts)):
            shorter = prompt.without_oldest(k)
            ids = self.tokenizer(shorter.text, add_special_tokens=True)["input_ids"]
            if len(ids) + extra <= self.max_length:
                self.truncated += 1
                if self.truncated == 1:
                    warnings.warn(f"sample {prompt.key!r}: left out the {k} oldest history item(s) to fit "
                                  f"data.max_length={self.max_length}; further cases are only counted "
                                  "(collator.truncated)", stacklevel=3)
                return shorter, ids
        raise DataError(f"sample {prompt.key!r}: {len(ids) + extra} tokens exceed data.max_length={self.max_length} "
                        "even with one history item (raise data.max_length or lower prepare.num_candidates)")

    @staticmethod
    def _slot_map(placeholder_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = placeholder_items >= 0
        batch_items, inverse = torch.unique(placeholder_items[mask], sorted=True, return_inverse=True)
        slots = torch.full_like(placeholder_items, -1)
        slots[mask] = inverse
        return batch_items, slots


class TrainCollator(_Collator):
    """Prompt + answer + EOS, right-padded; labels are -100 everywhere but the answer and its EOS."""

    def __call__(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        prompt_ids = self._prompt_ids(prompts)
        answer_ids = encode_answers(self.tokenizer, [p.answer for p in prompts])
        rows = []
        for p, ids, ans in zip(prompts, prompt_ids, answer_ids):
            p, ids = self._fit(p, ids, len(ans) + 1)
            full = ids + ans + [self.eos_id]
            items = self._placeholders(p, ids) + [-1] * (len(ans) + 1)
            labels = [IGNORE_INDEX] * len(ids) + ans + [self.eos_id]
            rows.append((full, items, labels))
        width = max(len(r[0]) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
        items = torch.full((b, width), -1, dtype=torch.long)
        for i, (ids, its, lab) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            attention[i, :n] = 1
            labels[i, :n] = torch.tensor(lab)
            items[i, :n] = torch.tensor(its)
        batch_items, slots = self._slot_map(items)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "batch_items": batch_items, "slots": slots}


class GenerationCollator(_Collator):
    """The prompts alone, left-padded so every row's generation starts at the same position."""

    def __call__(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        prompt_ids = self._prompt_ids(prompts)
        rows = []
        for p, ids in zip(prompts, prompt_ids):
            p, ids = self._fit(p, ids, 0)
            rows.append((ids, self._placeholders(p, ids)))
        width = max(len(r[0]) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        items = torch.full((b, width), -1, dtype=torch.long)
        for i, (ids, its) in enumerate(rows):
            n = len(ids)
            input_ids[i, width - n:] = torch.tensor(ids)
            attention[i, width - n:] = 1
            items[i, width - n:] = torch.tensor(its)
        batch_items, slots = self._slot_map(items)
        return {"input_ids": input_ids, "attention_mask": attention, "batch_items": batch_items, "slots": slots}
