"""Greedy answers of a causal LM to a batch of prompts: the accuracy probe for the facts model."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 1, batch_size: int = 256) -> list[str]:
    """Decode `max_new_tokens` greedy tokens after each prompt (left-padded batches, <s> included)."""
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(prompt).input_ids for prompt in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        generated = []
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            generated.append(token)
            ids = torch.cat([ids, token], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        tokens = torch.cat(generated, dim=1)
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]
    return answers


def answer_accuracy(model, tokenizer, prompts: list[str], expected: list[str]) -> float:
    """Fraction of prompts whose greedy continuation starts with the expected answer's words."""
    if not prompts:
        raise ValueError("no prompts to score")
    width = max(len(tokenizer(answer, add_special_tokens=False).input_ids) for answer in expected)
    got = greedy_answers(model, tokenizer, prompts, max_new_tokens=width)
    hits = sum(answer.split()[:len(want.split())] == want.split() for answer, want in zip(got, expected))
    return hits / len(prompts)
