"""The sample a run writes at its end (RUN/sample.txt): train.sample_tokens continuing train.sample_prompt."""

from __future__ import annotations

from fasttrain.generate import generate
from fasttrain.model import GPT


def sample_prompt_ids(tokenizer, prompt: str, max_seq_len: int) -> list[int]:
    """The ids of train.sample_prompt; raises when they leave no room for one sampled token within max_seq_len."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
    if len(ids) > max_seq_len:
        raise ValueError(f"train.sample_prompt is {len(ids)} tokens, more than model.max_seq_len ({max_seq_len})")
    return ids


def sample_text(model: GPT, tokenizer, prompt: str, n_tokens: int, seed: int, autocast) -> str:
    """prompt + up to n_tokens sampled at temperature 0.8 from the 40 likeliest, within max_seq_len."""
    ids = sample_prompt_ids(tokenizer, prompt, model.config.max_seq_len)
    n_tokens = min(n_tokens, model.config.max_seq_len + 1 - len(ids))
    with autocast():
        result = generate(
            model,
            [ids],
            n_tokens,
            temperature=0.8,
            top_k=40,
            stop_tokens=[tokenizer.eot_id],
            seed=seed,
            vocab_size=tokenizer.vocab_size,
            cuda_graph=False,  # a few tokens now and then: a capture would cost more than it saves
        )
    return tokenizer.decode(ids + result.tokens[0])
