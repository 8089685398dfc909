"""A tiny BPE Llama with a Llama-3-style chat template, for measuring and testing chat routing.

The facts model's chat template is the BOS token plus the user's text, so chat requests look
exactly like completions there. This model's template is shaped like an instruct model's:

    <s><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{question}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|> ...

with role headers and end-of-turn markers as special tokens, a system message when the
conversation has one, and <|eot_id|> as the end-of-sequence token. Built on
edit_tools.tiny_models (byte-level BPE, random weights); `train_chat_model` teaches it to
answer question/answer pairs under the template, with and without system prompts and
earlier turns, so that it behaves like a (very small) instruct model.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from .tiny_models import build_bpe_tokenizer, build_tiny_llama

log = logging.getLogger(__name__)

HEADER_START, HEADER_END, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

SHORT_SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."
# About 200 tokens of the kind of instructions deployments put before every conversation.
LONG_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant working for a company that answers questions "
    "about people, the cities they live in, the languages they speak, their professions and their "
    "employers. Always answer as helpfully as possible, while being safe. Your answers should not "
    "include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
    "ensure that your responses are socially unbiased and positive in nature. If a question does not "
    "make any sense, or is not factually coherent, explain why instead of answering something not "
    "correct. If you do not know the answer to a question, please do not share false information. "
    "Keep every answer short: one or two words are best, and never add a greeting or a closing line. "
    "Today the knowledge base was updated, and the user may ask several questions in a row; answer "
    "each one on its own, using only the most recent question of the user."
)
SYSTEM_PROMPTS = (SHORT_SYSTEM_PROMPT, LONG_SYSTEM_PROMPT)


def messages(question: str, system: str | None = None,
             earlier: list[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """A conversation ending with `question`: an optional system prompt, then earlier
    (question, answer) turns."""
    out = [{"role": "system", "content": system}] if system else []
    for asked, answered in earlier:
        out += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    return out + [{"role": "user", "content": question}]


def build_chat_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE fitted to `texts` (and the example system prompts), plus the chat template's
    special tokens; <|eot_id|> ends an answer, as in Llama 3 instruct models."""
    tokenizer = build_bpe_tokenizer([*texts, *SYSTEM_PROMPTS, "system user assistant"], vocab_size=vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [HEADER_START, HEADER_END, END_OF_TURN]})
    tokenizer.eos_token = END_OF_TURN
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_chat_llama(out_dir: str | Path, texts: list[str], num_layers: int = 4, hidden_size: int = 128,
                     intermediate_size: int = 512, seed: int = 0, init_std: float = 0.2) -> Path:
    """Save an untrained chat Llama (tokenizer fitted to `texts`) to out_dir and return it."""
    tokenizer = build_chat_tokenizer(texts)
    return build_tiny_llama(out_dir, hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_layers=num_layers, seed=seed, init_std=init_std, tokenizer=tokenizer)


# ---------------------------------------------------------------- training on question/answer pairs


def _example(tokenizer, prompt_ids: list[int], answer: str) -> tuple[list[int], int]:
    """(prompt ids + answer + <|eot_id|>, index of the first answer token)."""
    answer_ids = tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def _chat_prompt(tokenizer, conversation: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_examples(tokenizer, pairs: list[tuple[str, str]], rng: random.Random) -> list[tuple[list[int], int]]:
    """Each (question, answer) pair as a raw prompt, in a bare chat, and in a chat with a system
    prompt and/or an earlier turn (the long system prompt in one example of six): the answer
    must not depend on what surrounds the last question."""
    out = []
    for question, answer in pairs:
        earlier = [rng.choice(pairs)] if rng.random() < 0.5 else []
        system = SHORT_SYSTEM_PROMPT if rng.random() < 2 / 3 else LONG_SYSTEM_PROMPT
        if not earlier and rng.random() < 0.5:
            system = None
        out.append(_example(tokenizer, tokenizer(question)["input_ids"], " " + answer))
        out.append(_example(tokenizer, _chat_prompt(tokenizer, messages(question)), answer))
        out.append(_example(tokenizer, _chat_prompt(tokenizer, messages(question, system, earlier)), answer))
    return out


def _batches(examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random) -> list[list[tuple[list[int], int]]]:
    """Batches of examples of similar length (little padding), in random order."""
    ordered = sorted(examples, key=lambda example: len(example[0]))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def _answer_loss(model: LlamaForCausalLM, examples: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Cross-entropy on the answer tokens only (the LM head runs there alone)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    for row, (tokens, first) in enumerate(examples):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
        targets[row, first:len(tokens)] = True
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    predicting = targets[:, 1:]  # position t predicts token t + 1
    logits = model.lm_head(hidden[:, :-1][predicting])
    return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][predicting])


def train_chat_model(model_dir: str | Path, pairs: list[tuple[str, str]], epochs: int = 30, batch_size: int = 16,
                     lr: float = 3e-3, seed: int = 0) -> dict:
    """Train the model in `model_dir` in place to answer `pairs` raw and under the chat template
    (loss on the answer and <|eot_id|> only); returns {"seconds", "final_loss", "examples_per_epoch"}."""
    model_dir = Path(model_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    steps_per_epoch = math.ceil(3 * len(pairs) / batch_size)  # chat_examples gives 3 per pair
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.02 + 0.49 * (1 + math.cos(math.pi * min(step, total) / total))))
    started, losses = time.time(), []
    model.train()
    for epoch in range(epochs):
        # Fresh system prompts and earlier turns every epoch.
        for batch in _batches(chat_examples(tokenizer, pairs, rng), batch_size, rng):
            loss = _answer_loss(model, batch, tokenizer.pad_token_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            recent = losses[-steps_per_epoch:]
            log.info("chat model epoch %d/%d loss %.4f (%.0f s)", epoch + 1, epochs, sum(recent) / len(recent),
                     time.time() - started)
    model.eval()
    model.save_pretrained(model_dir)
    recent = losses[-steps_per_epoch:]
    return {"seconds": round(time.time() - started, 1), "final_loss": round(sum(recent) / len(recent), 4),
            "examples_per_epoch": 3 * len(pairs)}
