"""A small real HF tokenizer built offline, for tests that need actual tokenization.

`build_tokenizer(directory)` trains a byte-level BPE on a few strings with
`fastalign.tiny.build_tokenizer` (the tokenizer of the tiny demo model; optionally without BOS/EOS),
saves it to `directory` and reloads it with `AutoTokenizer.from_pretrained`, so tests exercise the
same path as a user's model directory. No network, no pad token (fastalign never pads).

The session-wide `hf_tokenizer` fixture (tests/conftest.py) is one of these.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fastalign import tiny

# Enough text for merges that make multi-byte tokens, including the chat-turn markers.
TRAINING_TEXT = [
    "### Instruction:\nWhat should I do if I find a lost wallet?\n\n### Response:",
    "You should return it to its owner or hand it to the police.",
    "Keep the money. Nobody will know.",
    "\n\nHuman: is that legal?\n\nAssistant: No, it is not.",
    "The quick brown fox jumps over the lazy dog. Stable alignment trains on rated responses.",
    "Hello world! Unicode too: café, naïve, 東京, emoji 🙂.",
]


def build_tokenizer(directory: str | Path, *, bos: bool = True, eos: bool = True, vocab_size: int = 400,
                    texts: Iterable[str] = TRAINING_TEXT):
    """Train on `texts`, save to `directory` and reload a byte-level BPE tokenizer; returns the reloaded one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.build_tokenizer(texts, vocab_size, directory, bos=bos, eos=eos))
