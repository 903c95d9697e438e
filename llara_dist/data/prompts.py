"""Samples -> LLaRA prompts: per-domain phrasings, hybrid (title + embedding slot) or text-only items.

Hybrid form (the paper's): every history item is written ``Title [HistoryEmb]`` and every candidate
``Title [CansEmb]``; the model later swaps the placeholder's embedding for the projected recommender
embedding of that item. Text-only form: ``Title [PH]`` for both, nothing injected (the curriculum
starts there). The answer is the target title; collation appends the tokenizer's EOS.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Literal

from llara_dist.errors import DataError

HISTORY_TOKEN = "[HistoryEmb]"
CANDIDATE_TOKEN = "[CansEmb]"
TEXT_TOKEN = "[PH]"
SPECIAL_TOKENS = (HISTORY_TOKEN, CANDIDATE_TOKEN, TEXT_TOKEN)

# Three phrasings per domain, after the LLaRA templates. {history} and {candidates} are the item
# lists, {n} the number of candidates.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "movie": (
        "This user has watched {history} in the previous. Please predict the next movie this user will "
        "watch. Choose the answer from the following {n} movie titles: {candidates}. Answer:",
        "Given the following movie viewing history of a user: {history}. Which movie will the user watch "
        "next? Select one of these {n} movies: {candidates}. Answer:",
        "A user recently watched these movies in order: {history}. From the {n} candidate movies "
        "{candidates}, which one is the user most likely to watch next? Answer:",
    ),
    "game": (
        "This user has played {history} in the previous. Please predict the next game this user will "
        "play. Choose the answer from the following {n} game titles: {candidates}. Answer:",
        "Given the following gaming history of a user: {history}. Which game will the user play next? "
        "Select one of these {n} games: {candidates}. Answer:",
        "A user recently played these games in order: {history}. From the {n} candidate games "
        "{candidates}, which one is the user most likely to play next? Answer:",
    ),
    "artist": (
        "This user has listened to {history} in the previous. Please predict the next artist this user "
        "will listen to. Choose the answer from the following {n} artists: {candidates}. Answer:",
        "Given the following listening history of a user: {history}. Which artist will the user listen "
        "to next? Select one of these {n} artists: {candidates}. Answer:",
        "A user recently listened to these artists in order: {history}. From the {n} candidate artists "
        "{candidates}, which one is the user most likely to listen to next? Answer:",
    ),
}

PromptMode = Literal["hybrid", "text"]


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt, without the answer
    answer: str  # the target title
    item_ids: tuple[int, ...]  # item id of each placeholder in textual order: history, then candidates
    key: str
    target: int
    candidates: tuple[int, ...]
    mode: PromptMode = "hybrid"
    history_parts: tuple[str, ...] = ()  # "Title [HistoryEmb]" per history item, as in `text`

    def without_oldest(self, k: int) -> "Prompt":
        """The same prompt with its `k` oldest history items (and their placeholders) left out."""
        if not 0 <= k < len(self.history_parts):
            raise ValueError(f"can drop 0..{len(self.history_parts) - 1} history items, not {k}")
        # The history list is the first place a placeholder occurs in every template, so the
        # first occurrence of the joined list is the one to replace.
        text = self.text.replace(", ".join(self.history_parts), ", ".join(self.history_parts[k:]), 1)
        return replace(self, text=text, item_ids=self.item_ids[k:], history_parts=self.history_parts[k:])


def template_index(seed: int, key: str) -> int:
    """Which of the three phrasings a sample gets: a pure function of (seed, key)."""
    return zlib.crc32(f"{seed}:{key}".encode()) % 3


def _title(titles: list[str], item: int, key: str) -> str:
    if not 0 <= item < len(titles):
        raise DataError(f"sample {key!r}: item id {item} out of range (expected 0 <= id < {len(titles)})")
    title = titles[item]
    for tok in SPECIAL_TOKENS:
        if tok in title:
            raise DataError(f"item {item}: title {title!r} contains the reserved token {tok}")
    return title


def build_prompt(sample: dict, titles: list[str], *, mode: PromptMode, domain: str, seed: int) -> Prompt:
    """The prompt for one sample; it must carry ``candidates`` (stored, or drawn by the stream)."""
    if domain not in TEMPLATES:
        raise DataError(f"domain: expected one of {', '.join(TEMPLATES)}, got {domain!r}")
    if mode not in ("hybrid", "text"):
        raise ValueError(f"mode: expected 'hybrid' or 'text', got {mode!r}")
    key = sample["key"]
    if "candidates" not in sample:
        raise DataError(f"sample {key!r}: no candidates (draw train candidates with train_candidates first)")
    h_tok, c_tok = (HISTORY_TOKEN, CANDIDATE_TOKEN) if mode == "hybrid" else (TEXT_TOKEN, TEXT_TOKEN)
    history_parts = tuple(f"{_title(titles, i, key)} {h_tok}" for i in sample["history"])
    history = ", ".join(history_parts)
    candidates = ", ".join(f"{_title(titles, i, key)} {c_tok}" for i in sample["candidates"])
    template = TEMPLATES[domain][template_index(seed, key)]
    text = template.format(history=history, candidates=candidates, n=len(sample["candidates"]))
    return Prompt(text=text, answer=_title(titles, sample["target"], key),
                  item_ids=tuple(sample["history"]) + tuple(sample["candidates"]), key=key,
                  target=sample["target"], candidates=tuple(sample["candidates"]), mode=mode,
                  history_parts=history_parts)
