"""Batches: (x, y) windows of a token array, random or in sequential epochs, resumable to the exact batch."""

from __future__ import annotations

import numpy as np
import torch

MODES = ("random", "sequential")


class Batches:
    """Windows of `seq_len + 1` tokens cut into inputs x and targets y = x shifted by one, both (B, T) int64.

    mode="random": each row starts at a uniform offset; batch i draws from a generator seeded by (seed, i), so the
    position is just the batch counter. mode="sequential": non-overlapping windows with stride T in order, B per
    batch, wrapping around at the end of each epoch (for evaluation, or epoch-based training).

    Ranks of a job of world_size processes share the stream: rank r takes batches r, r + world_size, ..., so the
    ranks' batches are disjoint, and together those of one process taking world_size batches per step. `step`
    counts the job's batches, the same on every rank, so a saved position resumes at any world size.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        mode: str = "random",
        rank: int = 0,
        world_size: int = 1,
    ):
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
            raise TypeError(
                f"tokens must be a 1-D numpy array (e.g. corpus.train), got {type(tokens).__name__}"
                f"{getattr(tokens, 'shape', '')}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_rank(rank, world_size)
        if len(tokens) < seq_len + 1:
            raise ValueError(f"tokens has {len(tokens):,} tokens; seq_len={seq_len} needs at least {seq_len + 1}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.step = 0
        # Sequential windows: window w covers tokens[w*T : w*T + T + 1]; the last token only ever serves as a target.
        self.windows = (len(tokens) - 1) // seq_len

    @property
    def epoch(self) -> float:
        """Passes over the split so far: tokens served / tokens in the split (windows for sequential)."""
        if self.mode == "sequential":
            return self.step * self.batch_size / self.windows
        return self.step * self.batch_size * self.seq_len / (len(self.tokens) - 1)

    def _starts(self) -> np.ndarray:
        batch = self.step + self.rank
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, batch])
            return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        first = batch * self.batch_size
        return (np.arange(first, first + self.batch_size) % self.windows) * self.seq_len

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, T) int64 on the CPU."""
        starts = self._starts()
        rows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
        self.step += self.world_size
        xy = torch.from_numpy(rows)
        return xy[:, :-1], xy[:, 1:]

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """JSON-able position; loading it into Batches over the same tokens continues with the same batches."""
        return {
            "step": self.step,
            "seed": self.seed,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        check_resume_state(
            self, state, ("seed", "mode", "batch_size", "seq_len"), ("num_tokens", len(self.tokens)), "step"
        )
        self.step = state["step"]


def check_rank(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size {world_size}), got {rank!r}")


def check_resume_state(batches, state: dict, settings: tuple[str, ...], size: tuple[str, int], position: str) -> None:
    """Refuse a batch iterator's saved state that would not repeat the same batches: other settings, data of another
    size (size: the state's key and this iterator's value), or a position that is not an int >= 0."""
    kind = type(batches).__name__
    for name in settings:
        if state.get(name) != getattr(batches, name):
            raise ValueError(
                f"{kind} state has {name}={state.get(name)!r} but these batches have {getattr(batches, name)!r}: "
                "resuming would not repeat the same batches"
            )
    key, n = size
    if state.get(key) != n:
        raise ValueError(
            f"{kind} state was saved over {state.get(key)} {key.removeprefix('num_')} but these batches have {n}: the "
            "data changed since the checkpoint"
        )
    if not isinstance(state.get(position), int) or state[position] < 0:
        raise ValueError(f"{kind} state {position} must be a non-negative int, got {state.get(position)!r}")
