"""Context templates: short texts the model writes itself, put before each edit prompt.

Training an edit under varied prefixes makes it hold when the prompt appears mid-context.
Generated once per model (greedy, so deterministic) and stored in the artifact so that
appended edits reuse exactly the same templates.
"""

from __future__ import annotations

import torch

SEED_WORDS = ("I", "You", "Because", "Yes", "Q: ")
LENGTHS = (5, 10)
BARE = "{}"


@torch.no_grad()
def generate_context_templates(model, tokenizer) -> list[str]:
    """The bare template plus one greedy continuation per (length, seed word): 11 templates."""
    templates = [BARE]
    device = next(model.parameters()).device
    for length in LENGTHS:
        for seed in SEED_WORDS:
            ids = tokenizer(seed, return_tensors="pt").to(device)
            out = model.generate(
                **ids, max_new_tokens=length, do_sample=False, pad_token_id=_pad_id(tokenizer)
            )
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            # Braces would be read as format fields.
            text = text.replace("{", " ").replace("}", " ").strip()
            templates.append(f"{text} {{}}")
    return templates


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
