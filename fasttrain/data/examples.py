"""Prompt/completion examples for fine-tuning: JSONL records -> token ids whose loss counts the completion only,
packed several to a sequence (each attending only to itself: cu_seqlens and per-example positions for the model's
varlen path) or padded one to a sequence.

    examples = read_examples(["train.jsonl"], prompt_field="question", completion_field="answer")
    batches = ExampleBatches(encode_examples(tokenizer, examples), batch_size=8, seq_len=512, mode="pack")
    idx, targets, positions, cu_seqlens = batches.next()
    loss = model(idx, targets, positions=positions, cu_seqlens=cu_seqlens)[1]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fasttrain.data.batches import check_rank, check_resume_state

IGNORE = -100
"""Target of a token the loss skips (the prompt, padding): cross-entropy's ignore_index."""
MODES = ("pack", "pad")


def read_examples(paths: list[str], prompt_field: str = "prompt", completion_field: str = "completion"):
    """(prompt, completion) of every record of the JSONL files; a record without both string fields is an error
    naming the file and line."""
    out = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
                fields = (record.get(prompt_field), record.get(completion_field)) if isinstance(record, dict) else ()
                if len(fields) != 2 or not all(isinstance(v, str) for v in fields):
                    raise ValueError(f"{path}:{n}: needs string fields {prompt_field!r} and {completion_field!r}")
                out.append(fields)
    if not out:
        raise ValueError(f"no prompt/completion records in {', '.join(str(Path(p)) for p in paths)}")
    return out


def encode_examples(tokenizer, examples) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per example (input ids, targets): ids = prompt + completion + end-of-text, inputs ids[:-1], targets ids[1:]
    with IGNORE where the target is a prompt token, so only the completion and its end-of-text are learned."""
    out = []
    for prompt, completion in examples:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        ids = np.array(p + c + [tokenizer.eot_id], dtype=np.int64)
        targets = ids[1:].copy()
        targets[: max(len(p) - 1, 0)] = IGNORE
        out.append((ids[:-1], targets))
    return out


class ExampleSet:
    """The prompt/completion examples of a DataConfig with format 'prompt_completion', encoded and split:
    `train` and `val` lists of (input ids, targets), `tokenizer`, `files` read. The run's counterpart of a Corpus."""

    def __init__(self, tokenizer, files: list[Path], train: list, val: list):
        self.tokenizer, self.files, self.train, self.val = tokenizer, files, train, val
        self.cut = self.dropped = 0
        self.seq_len: int | None = None

    def fit(self, seq_len: int) -> None:
        """Drop the examples whose first seq_len targets hold no completion token (a prompt of seq_len tokens or
        more: nothing to learn, and a row of them would average a loss over no tokens); count those to be cut."""
        self.seq_len = seq_len
        for name in ("train", "val"):
            kept = [(i, t) for i, t in getattr(self, name) if (t[:seq_len] != IGNORE).any()]
            self.dropped += len(getattr(self, name)) - len(kept)
            self.cut += sum(len(i) > seq_len for i, _ in kept)
            setattr(self, name, kept)

    def summary(self) -> str:
        lines = [
            f"prompt/completion examples: {len(self.train):,} train, {len(self.val):,} validation, from "
            f"{len(self.files)} file(s); tokenizer {self.tokenizer.name}"
        ]
        if self.cut:
            lines.append(f"  {self.cut:,} example(s) longer than train.seq_len {self.seq_len} cut to it (end lost)")
        if self.dropped:
            lines.append(
                f"  {self.dropped:,} example(s) dropped: the prompt fills train.seq_len {self.seq_len}, leaving no "
                f"completion token to learn"
            )
        return "\n".join(lines)

    def summary_json(self) -> dict:
        return {
            "format": "prompt_completion",
            "files": [str(f) for f in self.files],
            "examples": {"train": len(self.train), "val": len(self.val)},
            "cut": self.cut,
            "dropped": self.dropped,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer.name,
        }

    def report(self, run_dir: str | Path | None = None) -> None:
        """Print the summary; with run_dir, also write it there as data_summary.txt and data_summary.json."""
        text = self.summary()
        print(text, flush=True)
        if run_dir is not None:
            from fasttrain.data import summary

            summary.write(Path(run_dir), text, self.summary_json())


def prepare_examples(cfg) -> ExampleSet:
    """The ExampleSet of DataConfig cfg: the JSONL files of cfg.paths (files, or folders searched for .jsonl and
    .ndjson), read with cfg.prompt_field and cfg.completion_field, tokenized with cfg.tokenizer ('byte' or a
    tokenizer.json; 'bpe' is refused: nothing to train it on but the examples), split per example as a corpus is
    split per document (cfg.val_fraction, cfg.seed)."""
    from fasttrain.data.config import JSONL_EXTENSIONS
    from fasttrain.data.shards import _split
    from fasttrain.data.tokenizers import ByteTokenizer, load_tokenizer_file

    cfg.validate()
    if cfg.tokenizer == "bpe":
        raise ValueError(
            "data.tokenizer 'bpe' does not go with data.format 'prompt_completion': give 'byte' or a tokenizer.json "
            "(--init.from gives its own)"
        )
    files = []
    for path in map(Path, cfg.paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in JSONL_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data.paths: {str(path)!r} does not exist")
    if not files:
        raise ValueError(f"data.paths holds no .jsonl or .ndjson file for data.format 'prompt_completion': {cfg.paths}")
    tokenizer = ByteTokenizer() if cfg.tokenizer == "byte" else load_tokenizer_file(cfg.tokenizer)
    encoded = encode_examples(tokenizer, read_examples(files, cfg.prompt_field, cfg.completion_field))
    is_val = _split(len(encoded), cfg.val_fraction, cfg.seed)
    train = [e for e, v in zip(encoded, is_val) if not v]
    val = [e for e, v in zip(encoded, is_val) if v]
    return ExampleSet(tokenizer, files, train, val)


class ExampleBatches:
    """Rows of seq_len tokens built once from the examples (an example longer than seq_len is cut to it), served
    batch_size at a time epoch after epoch: in a random order per epoch seeded by (seed, epoch), or in order when
    shuffle is False (evaluation). The position is the count of rows served, so state_dict() is all a resume needs.

    mode 'pack': examples fill each row in order until the next one does not fit; the rest of a row is padding, a
    segment of its own whose targets are IGNORE. mode 'pad': one example per row. next() -> (idx, targets,
    positions, cu_seqlens): (B, T) long each, and the (N + 1,) int32 offsets of the N segments in the B*T tokens.

    Ranks of a job of world_size processes share the stream as fasttrain.data.Batches' do: rank r takes batches r,
    r + world_size, ...; `served` counts the job's rows, the same on every rank.
    """

    def __init__(
        self,
        examples,
        batch_size: int,
        seq_len: int,
        mode: str = "pack",
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_rank(rank, world_size)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not examples:
            raise ValueError("no examples to batch")
        self.batch_size, self.seq_len, self.mode, self.seed, self.shuffle = batch_size, seq_len, mode, seed, shuffle
        self.truncated, self.served = 0, 0
        self.rank, self.world_size = rank, world_size
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        for ids, targets in examples:
            if len(ids) > seq_len:
                ids, targets, self.truncated = ids[:seq_len], targets[:seq_len], self.truncated + 1
            used = sum(len(i) for i, _ in rows[-1])
            if rows[-1] and (mode == "pad" or used + len(ids) > seq_len):
                rows.append([])
            rows[-1].append((ids, targets))
        self.rows = [self._row(row, pad_id) for row in rows]
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, segments, pad_id: int):
        pad = self.seq_len - sum(len(i) for i, _ in segments)
        if pad:
            segments = [*segments, (np.full(pad, pad_id), np.full(pad, IGNORE))]
        lengths = [len(i) for i, _ in segments]
        positions = np.concatenate([np.arange(n) for n in lengths])
        return np.concatenate([i for i, _ in segments]), np.concatenate([t for _, t in segments]), positions, lengths

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.rows)
            self._orders = {  # the current epoch's order only
                epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            }
        return self._orders[epoch]

    @property
    def epoch(self) -> float:
        """Passes over the rows so far."""
        return self.served / len(self.rows)

    def next(self):
        picked = []
        first = self.served + self.rank * self.batch_size
        for row in range(first, first + self.batch_size):
            epoch, i = divmod(row, len(self.rows))
            picked.append(self.rows[self._order(epoch)[i]])
        self.served += self.batch_size * self.world_size
        idx, targets, positions = (torch.from_numpy(np.stack([r[k] for r in picked])).long() for k in range(3))
        lengths = [n for r in picked for n in r[3]]
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        return idx, targets, positions, cu_seqlens

    def state_dict(self) -> dict:
        """JSON-able position; loading it into ExampleBatches over the same examples continues with the same
        batches."""
        keys = ("served", "seed", "mode", "batch_size", "seq_len", "shuffle")
        return {**{k: getattr(self, k) for k in keys}, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        settings = ("seed", "mode", "batch_size", "seq_len", "shuffle")
        check_resume_state(self, state, settings, ("rows", len(self.rows)), "served")
        self.served = state["served"]
