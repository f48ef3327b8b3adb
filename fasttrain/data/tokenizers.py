"""Tokenizers: byte-level (no files), BPE trained on the corpus, or any local tokenizer.json (HF `tokenizers`).

Every tokenizer has an end-of-text id that separates packed documents, and `to_config()` returns a JSON-able dict
that rebuilds it exactly (`tokenizer_from_config`): an HF tokenizer embeds its whole JSON, so a checkpoint that
records the config decodes with the same tokenizer on any machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from fasttrain._files import atomic_write_text

EOT_TOKEN = "<|endoftext|>"
# End-of-text names used by common tokenizer.json files, tried in order before adding EOT_TOKEN.
_KNOWN_EOT = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text as 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` as a 1-D uint16 array, without a Python list in between."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids outside 0..255 (end-of-text, padding of a model's rounded-up vocabulary) are dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_config(self) -> dict:
        return {"kind": "byte"}


class HFTokenizer:
    """A HF `tokenizers.Tokenizer` with an end-of-text token (added when the tokenizer.json has none)."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eot = next((t for t in _KNOWN_EOT if t in vocab), None)
        if eot is None:
            tokenizer.add_special_tokens([EOT_TOKEN])
            vocab = tokenizer.get_vocab(with_added_tokens=True)
            eot = EOT_TOKEN
        self.eot_id = vocab[eot]
        # Text that spells a special token ("<|endoftext|>" in a document about LLMs) is encoded as ordinary text,
        # as nanoGPT's encode_ordinary does: HF would otherwise match it as the token, adding a document boundary
        # and losing the text on decode. Not stored in the JSON, so it is set on every load.
        tokenizer.encode_special_tokens = True
        # Added tokens can sit above get_vocab_size(); the largest id bounds the embedding table.
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        # No post-processor specials (BOS etc.): documents are packed with end-of-text only.
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets: 1.6x faster on stdlib code (0.92 vs
        # 0.58 MB/s on the shared 2-core CI machine, BPE-4096).
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (temp name, then rename): a run directory never holds half a tokenizer."""
        atomic_write_text(path, self._tok.to_str(pretty=True))  # what tokenizers.Tokenizer.save writes

    def to_config(self) -> dict:
        return {"kind": "hf", "name": self.name, "json": self.to_json()}


Tokenizer = ByteTokenizer | HFTokenizer


def tokenizer_from_config(config: dict) -> Tokenizer:
    """Rebuild the tokenizer that produced `config` with `.to_config()` (e.g. from a checkpoint)."""
    if not isinstance(config, dict) or config.get("kind") not in ("byte", "hf"):
        raise ValueError(f"tokenizer config must be a dict with kind 'byte' or 'hf', got {config!r:.200}")
    if config["kind"] == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer as _HF

    if not isinstance(config.get("json"), str):
        raise ValueError("tokenizer config of kind 'hf' must embed the tokenizer JSON string under 'json'")
    return HFTokenizer(_HF.from_str(config["json"]), config.get("name", "tokenizer.json"))


def load_tokenizer_file(path: str | Path) -> HFTokenizer:
    """A local tokenizer.json; ValueError naming `tokenizer` when it is not one."""
    from tokenizers import Tokenizer as _HF

    try:
        tok = _HF.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for a malformed file
        raise ValueError(f"tokenizer {str(path)!r} is not a valid tokenizer.json: {exc}") from exc
    return HFTokenizer(tok, f"tokenizer.json:{Path(path).name}")


MAX_PIECE = 128
"""Longest run of non-space characters that BPE sees as one piece: longer runs (a minified line, base64, a DNA string)
are cut into pieces of this many characters before the GPT-2 split, so BPE training time is linear in the corpus
rather than quadratic in its longest word. No merge spans the cut, so no token is longer than this."""


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE over `texts`: every byte is in the alphabet, so any text round-trips."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as _HF

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(rf"\S{{{MAX_PIECE}}}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tok, f"bpe-{vocab_size}")


def tokenizer_spec(tokenizer: str, vocab_size: int) -> dict:
    """What identifies the tokenizer in the cache key: its kind, and the content hash of a tokenizer.json (not its
    path: `fasttrain eval` writes the run's tokenizer to a fresh temporary file each time)."""
    if tokenizer == "byte":
        return {"kind": "byte"}
    if tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": vocab_size}
    digest = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    return {"kind": "file", "sha256": digest}
