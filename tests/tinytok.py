"""The tests' own tokenizer: a GPT-2-style byte-level BPE trained here, in milliseconds, so the tiny
models need no real checkpoint (``tiny_llama_dir`` and the family matrix use it; conftest saves it).

Trained on a frozen copy of ARCHITECTURE.md (``data/tokenizer-text.md``, the project's own prose):
every byte has a token (any text encodes), SmolLM2's special tokens sit at SmolLM2's ids 0-2, no
BOS/EOS is added around a text (as SmolLM2), and it has a chat template. Deterministic: the same
text and trainer settings give the same merges, on any machine.
"""
from __future__ import annotations

from pathlib import Path

TEXT = Path(__file__).parent / "data" / "tokenizer-text.md"
VOCAB = 512  # tiny_llama_dir's vocabulary
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk/pad, bos, eos: ids 0, 1, 2
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train(vocab_size: int = VOCAB):
    """The tokenizer with ``vocab_size`` tokens (special tokens and the 256 bytes included), as a
    transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    paragraphs = TEXT.read_text(encoding="utf-8").split("\n\n")
    tk.train_from_iterator(paragraphs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if tk.get_vocab_size() != vocab_size:
        raise ValueError(f"{TEXT} gives {tk.get_vocab_size()} tokens, not {vocab_size}")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], pad_token=SPECIALS[0], chat_template=CHAT_TEMPLATE)


def save(out: Path, vocab_size: int = VOCAB) -> Path:
    """:func:`train` saved as a normal HF tokenizer folder (tokenizer.json, tokenizer_config.json)."""
    train(vocab_size).save_pretrained(out)
    return out
