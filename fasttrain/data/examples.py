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


class ExampleBatches:
    """Rows of seq_len tokens built once from the examples (an example longer than seq_len is cut to it), served
    batch_size at a time in a seeded random order, epoch after epoch.

    mode 'pack': examples fill each row in order until the next one does not fit; the rest of a row is padding, a
    segment of its own whose targets are IGNORE. mode 'pad': one example per row. next() -> (idx, targets,
    positions, cu_seqlens): (B, T) long each, and the (N + 1,) int32 offsets of the N segments in the B*T tokens.
    """

    def __init__(self, examples, batch_size: int, seq_len: int, mode: str = "pack", pad_id: int = 0, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not examples:
            raise ValueError("no examples to batch")
        self.batch_size, self.seq_len, self.truncated = batch_size, seq_len, 0
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
        for ids, targets in examples:
            if len(ids) > seq_len:
                ids, targets, self.truncated = ids[:seq_len], targets[:seq_len], self.truncated + 1
            used = sum(len(i) for i, _ in rows[-1])
            if rows[-1] and (mode == "pad" or used + len(ids) > seq_len):
                rows.append([])
            rows[-1].append((ids, targets))
        self.rows = [self._row(row, pad_id) for row in rows]
        self._rng = np.random.default_rng(seed)
        self._order, self._next = self._rng.permutation(len(self.rows)), 0

    def _row(self, segments, pad_id: int):
        pad = self.seq_len - sum(len(i) for i, _ in segments)
        if pad:
            segments = [*segments, (np.full(pad, pad_id), np.full(pad, IGNORE))]
        lengths = [len(i) for i, _ in segments]
        positions = np.concatenate([np.arange(n) for n in lengths])
        return np.concatenate([i for i, _ in segments]), np.concatenate([t for _, t in segments]), positions, lengths

    def next(self):
        picked = []
        for _ in range(self.batch_size):
            if self._next == len(self._order):
                self._order, self._next = self._rng.permutation(len(self.rows)), 0
            picked.append(self.rows[self._order[self._next]])
            self._next += 1
        idx, targets, positions = (torch.from_numpy(np.stack([r[k] for r in picked])).long() for k in range(3))
        lengths = [n for r in picked for n in r[3]]
        cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
        return idx, targets, positions, cu_seqlens
