"""Reference answers for the plugin's parity tests: the transformers MEMOIR model, from token ids.

vLLM reports the exact prompt token ids it served (return_token_ids), so the reference
runs on those ids rather than re-tokenizing (chat templates, for one, add no <s>).
"""

from __future__ import annotations

import torch

from edit_tools.hf_model import MemoirHFModel


@torch.no_grad()
def greedy_ids(hf: MemoirHFModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (EOS ignored), batched with left padding and per-row routes."""
    ids, attention = hf._pad(prompts, left=True)
    hf._start_routing(attention.bool())
    out = hf.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=hf.tokenizer.pad_token_id, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def token_logprobs(hf: MemoirHFModel, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probability of each completion token given the prompt (routed on the prompt)."""
    ids = torch.tensor([prompt + completion], device=hf.device)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[0, : len(prompt)] = True
    hf._start_routing(prompt_mask)
    logits = hf.model(input_ids=ids, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits[0], dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logprobs[positions, torch.tensor(completion)].tolist()
