"""Data: sources (text, code, JSONL, HTML, notebooks, tables, PDFs, images) -> tokenizer -> token shards -> batches.

corpus = prepare(DataConfig(paths=["docs/"], tokenizer="bpe"))
batches = Batches(corpus.train, batch_size=8, seq_len=256)
x, y = batches.next()
"""

from fasttrain.data.config import DataConfig
from fasttrain.data.corpus import Corpus
from fasttrain.data.shards import prepare
from fasttrain.data.tokenizers import ByteTokenizer, HFTokenizer, tokenizer_from_config

__all__ = ["DataConfig", "Corpus", "prepare", "Batches", "ByteTokenizer", "HFTokenizer", "tokenizer_from_config"]


def __getattr__(name: str):
    # Batches needs torch (~2 s to import here); the spawn workers of `prepare` import this package and never batch,
    # so torch is loaded only when Batches is first used.
    if name == "Batches":
        from fasttrain.data.batches import Batches

        return Batches
    raise AttributeError(f"module 'fasttrain.data' has no attribute {name!r}")
