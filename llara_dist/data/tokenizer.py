"""Tokenizers: make any Hugging Face tokenizer LLaRA-ready, or build a tiny one locally.

Real runs use the LLM's own tokenizer from its local directory (`prepare_tokenizer` adds the
placeholder tokens and a pad token). Tests and the demo use `build_tiny_tokenizer`: a byte-level
BPE trained in-process on the item titles and the prompt templates, so it needs no download and
is identical on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from llara_dist.data.prompts import SPECIAL_TOKENS, TEMPLATES

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the placeholder tokens (as special, never split) and a pad token if missing. Idempotent.

    The model must then have ``len(tokenizer)`` embedding rows (``resize_token_embeddings``).
    """
    vocab = tokenizer.get_vocab()
    missing = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        # A dedicated pad token (not EOS): labels mask padding by attention, but a pad == EOS
        # tokenizer would make "stop here" ambiguous in generation.
        tokenizer.add_special_tokens({"pad_token": PAD})
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; LLaRA needs one to end answers")
    return tokenizer


# Every prompt template ends with this; the answer follows it after a space.
ANSWER_CUE = "Answer:"


def encode_answers(tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]) -> list[list[int]]:
    """The tokens of each answer as it reads in running text after the prompt's ``Answer:``.

    Not ``tokenizer(answer)``: a byte-level BPE (GPT-2, Llama-3, Qwen, the tiny preset) encodes a
    word at the start of a text differently from the same word after a space (``Toy`` vs
    ``ĠToy``). Every title in the prompt's lists follows a space, so an answer tokenised alone
    would start with a different id than the candidate it names, and the model could not learn to
    copy the candidate's tokens (measured on the tiny preset: every answer's first token differed).
    SentencePiece tokenizers (Llama-2) put the word boundary in front of a text anyway; for them
    the result equals ``tokenizer(answer)``. Falls back to that when the cue's tokens are not a
    prefix of the joint encoding (a tokenizer merging across the space), and for an empty answer.
    """
    cue = tokenizer(ANSWER_CUE, add_special_tokens=False)["input_ids"]
    joint = tokenizer([f"{ANSWER_CUE} {a}" for a in answers], add_special_tokens=False)["input_ids"]
    out = []
    for answer, ids in zip(answers, joint):
        if answer and ids[:len(cue)] == cue and len(ids) > len(cue):
            out.append(list(ids[len(cue):]))
        else:
            out.append(list(tokenizer(answer, add_special_tokens=False)["input_ids"]))
    return out


def _training_corpus(titles: Sequence[str]) -> list[str]:
    corpus = list(titles)
    for templates in TEMPLATES.values():
        corpus.extend(t.format(history="", candidates="", n=20) for t in templates)
    return corpus


def build_tiny_tokenizer(titles: Sequence[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE trained on `titles` and the prompt templates.

    Has bos/eos/pad/unk and the three placeholder tokens; adds BOS in front of every encoded text
    (as Llama tokenizers do).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = [BOS, EOS, PAD, UNK, *SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_corpus(titles), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=1 << 20)
    return prepare_tokenizer(fast)
