"""DataConfig: where the text comes from, how it is tokenized, how it is split, where the shards live."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CODE_EXTENSIONS = [
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hpp",
    ".cu",
    ".cuh",
    ".rs",
    ".go",
    ".java",
    ".kt",
    ".scala",
    ".js",
    ".jsx",
    ".ts",
    ".tsx",
    ".rb",
    ".php",
    ".swift",
    ".m",
    ".lua",
    ".jl",
    ".r",
    ".sh",
    ".bash",
    ".sql",
    ".css",
    ".toml",
    ".yaml",
    ".yml",
    ".cmake",
]
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".markdown", ".rst")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
PDF_EXTENSIONS = (".pdf",)
HTML_EXTENSIONS = (".html", ".htm", ".xhtml")
NOTEBOOK_EXTENSIONS = (".ipynb",)
CSV_EXTENSIONS = {".csv": ",", ".tsv": "\t"}
PARQUET_EXTENSIONS = (".parquet",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
COMPRESSED_EXTENSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = ("text", "prompt_completion")
"""DataConfig.format: corpora of documents (fasttrain.data.prepare), or prompt/completion JSONL records
(fasttrain.data.examples.prepare_examples)."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    """Files and directories (searched recursively); empty means the Python standard library's own .py sources."""
    include: list[str] = field(default_factory=list)
    """Glob patterns, relative to each path, of the files kept (e.g. "*.md", "docs/**/*.txt"); empty keeps all."""
    exclude: list[str] = field(default_factory=list)
    """Glob patterns, relative to each path, of the files dropped; applied after `include`."""
    code_extensions: list[str] = field(default_factory=lambda: list(DEFAULT_CODE_EXTENSIONS))
    """File extensions read as source code (one document per file), besides the formats read by their own reader
    (text, JSONL, PDF, HTML, notebooks, CSV/TSV, Parquet, images; see docs/data.md)."""
    jsonl_field: str = "text"
    """The field of each JSONL record that holds its text."""
    format: str = "text"
    """"text": documents of any format above, every token learned. "prompt_completion": JSONL records with a
    prompt and a completion field, the loss on the completion only (fine-tuning; docs/finetuning.md)."""
    prompt_field: str = "prompt"
    """format "prompt_completion": the field of each JSONL record that holds the prompt."""
    completion_field: str = "completion"
    """format "prompt_completion": the field of each JSONL record that holds the completion."""
    packing: bool = True
    """format "prompt_completion": pack several examples into each sequence, none attending to another (True), or
    one example per sequence, padded (False)."""
    text_column: str = "text"
    """The column that holds the text in CSV/TSV files (by header), Parquet files and Hugging Face `datasets`
    folders; a table without it is skipped and counted."""
    dedup: bool = True
    """Drop documents whose text exactly repeats an earlier one (by content hash); the summary counts them."""
    ocr: bool = True
    """Read images and PDF pages without a text layer by OCR (needs `pip install fasttrain[ocr]`); False skips them."""
    max_decompressed_bytes: int = 1 << 30
    """Largest size a .gz/.zst file may decompress to; a larger one (a zip bomb) is skipped and counted."""
    tokenizer: str = "byte"
    """"byte" (256 byte values + end-of-text), "bpe" (byte-level BPE trained on the training documents), or a path
    to a tokenizer.json (given an <|endoftext|> token when it has no end-of-text of its own)."""
    vocab_size: int = 4096
    """Vocabulary size of the BPE tokenizer trained when tokenizer="bpe" (at least 257: 256 bytes + end-of-text)."""
    num_workers: int = 2
    """Most processes that read and tokenize files in parallel (fewer when the corpus is too small to repay their
    start-up); 0 or 1 works in this process. The shards are identical for any value."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a seeded draw per document index (at least one
    document each side; a one-document corpus gives its tail instead)."""
    max_bytes: int | None = None
    """Cap on the bytes of source files read, in sorted file order (the last text file is cut; a PDF is never cut
    and ends the corpus instead); None reads everything."""
    cache_dir: str | None = None
    """Folder of the token shards; None means $FASTTRAIN_CACHE, else ~/.cache/fasttrain/data."""
    seed: int = 0
    """Seed of the train/validation split."""

    def __post_init__(self) -> None:
        self.validate(check_files=False)

    def validate(self, check_files: bool = True) -> None:
        """Raise ValueError, naming the field, for settings that cannot work. Files are checked only when asked
        (by `prepare`), so a config saved in a checkpoint still loads on a machine without its tokenizer file."""
        for name in ("paths", "include", "exclude", "code_extensions"):
            value = getattr(self, name)
            if isinstance(value, (str, os.PathLike)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
                raise ValueError(f"DataConfig.{name} must be a list of strings, got {value!r}")
        if not all(str(e).startswith(".") for e in self.code_extensions):
            raise ValueError(f"DataConfig.code_extensions must start with '.', got {self.code_extensions!r}")
        if self.format not in FORMATS:
            raise ValueError(f"DataConfig.format must be one of {FORMATS}, got {self.format!r}")
        for name in ("jsonl_field", "text_column", "prompt_field", "completion_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"DataConfig.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("dedup", "ocr", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be true or false, got {getattr(self, name)!r}")
        m = self.max_decompressed_bytes
        if not isinstance(m, int) or isinstance(m, bool) or m <= 0:
            raise ValueError(f"DataConfig.max_decompressed_bytes must be a positive int, got {m!r}")
        if not isinstance(self.tokenizer, (str, os.PathLike)):
            raise ValueError(f"DataConfig.tokenizer must be 'byte', 'bpe' or a path, got {self.tokenizer!r}")
        if check_files and self.tokenizer not in ("byte", "bpe") and not Path(self.tokenizer).is_file():
            raise ValueError(
                f"DataConfig.tokenizer must be 'byte', 'bpe' or a path to a tokenizer.json; "
                f"{self.tokenizer!r} is not a file"
            )
        if self.tokenizer == "bpe" and not (isinstance(self.vocab_size, int) and self.vocab_size >= 257):
            raise ValueError(
                f"DataConfig.vocab_size must be an int >= 257 (256 bytes + end-of-text) for "
                f"tokenizer='bpe', got {self.vocab_size!r}"
            )
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be an int >= 0, got {self.num_workers!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            raise ValueError(f"DataConfig.max_bytes must be a positive int or None, got {self.max_bytes!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"DataConfig.seed must be an int >= 0 (numpy's seeds are), got {self.seed!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"DataConfig.cache_dir must be a path or None, got {self.cache_dir!r}")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("FASTTRAIN_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "fasttrain" / "data"
