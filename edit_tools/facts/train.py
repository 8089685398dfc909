"""Train the embedded facts model: a small Llama that knows the synthetic world.

    python -m edit_tools.facts.train --out models/facts-llama

Deterministic for a given seed and thread count: the world, the weight init, the phrasings
drawn each epoch and the batch order all derive from --seed. The loss is on the answer and
</s> only, so the model learns to answer each phrasing and stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from edit_tools.facts.answers import answer_accuracy
from edit_tools.facts.designs import world_of
from edit_tools.facts.world import DEFAULT_SEED, World, build_facts_tokenizer

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    seed: int = DEFAULT_SEED
    design: str = "classic"  # the world's design (edit_tools.facts.designs)
    hidden_size: int = 128
    intermediate_size: int = 1024  # wide, so the edited layer's features can single out a subject
    num_layers: int = 6
    num_heads: int = 4  # head_dim 32: vLLM's CPU attention needs >= 32
    epochs: int = 60
    phrasings_per_epoch: int = 1  # training phrasings drawn per fact each epoch
    batch_size: int = 64
    lr: float = 3e-3
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.02
    weight_decay: float = 0.0
    # One thread: results depend on the thread count, and on a shared CPU two OpenMP threads
    # ran 10x slower than one (measured), so one is both reproducible and fast.
    threads: int = 1
    eval_every: int = 5
    eval_sample: int = 600


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """(token ids of prompt + answer + </s>, index of the first target token)."""
    prompt_ids = tokenizer(prompt).input_ids
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


class PhrasingSampler:
    """Each epoch, `per_epoch` of every fact's training phrasings, shuffled.

    Drawing phrasings instead of visiting all of them every epoch gives each fact many more
    passes for the same compute; memorizing the facts, not the wording, is the slow part.
    """

    def __init__(self, world: World, tokenizer, per_epoch: int, seed: int):
        self.rng = random.Random(seed)
        self.per_epoch = per_epoch
        self.encoded = [
            [encode(tokenizer, fact.prompt(t), fact.answer) for t in fact.training_templates()]
            for fact in world.facts
        ]

    def epoch(self) -> list[tuple[list[int], int]]:
        drawn = [ex for phrasings in self.encoded for ex in self.rng.sample(phrasings, min(self.per_epoch, len(phrasings)))]
        self.rng.shuffle(drawn)
        return drawn

    @property
    def epoch_size(self) -> int:
        return sum(min(self.per_epoch, len(p)) for p in self.encoded)


def collate(batch: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels (-100 everywhere but the targets)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for row, (tokens, target_start) in enumerate(batch):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
        labels[row, target_start:len(tokens)] = ids[row, target_start:len(tokens)]
    return ids, attention, labels


def answer_loss(model: LlamaForCausalLM, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    # Position t predicts token t+1; run the LM head only where a target follows (cheap).
    targets = labels[:, 1:]
    where = targets != -100
    logits = model.lm_head(hidden[:, :-1][where])
    return torch.nn.functional.cross_entropy(logits.float(), targets[where])


def lr_factor(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to final_lr_fraction (a calm end point)."""
    warmup = max(1, int(total * settings.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return settings.final_lr_fraction + (1 - settings.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(tokenizer, settings: TrainSettings) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,  # a separate output head trains more stably at high lr
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def sample_prompts(world: World, heldout: bool, count: int, seed: int) -> tuple[list[str], list[str]]:
    """A fixed sample of (prompt, answer): held-out phrasings, or one random training phrasing per fact."""
    rng = random.Random(seed)
    facts = rng.sample(world.facts, min(count, len(world.facts)))
    prompts = [f.prompt(f.heldout_template if heldout else rng.choice(f.training_templates())) for f in facts]
    return prompts, [f.answer for f in facts]


def measure(model, tokenizer, world: World, count: int, seed: int) -> dict[str, float]:
    train_prompts, train_answers = sample_prompts(world, heldout=False, count=count, seed=seed)
    held_prompts, held_answers = sample_prompts(world, heldout=True, count=count, seed=seed)
    return {
        "train_phrasing_accuracy": answer_accuracy(model, tokenizer, train_prompts, train_answers),
        "heldout_phrasing_accuracy": answer_accuracy(model, tokenizer, held_prompts, held_answers),
    }


def no_decay(name: str) -> bool:
    return name.endswith("norm.weight") or "embed_tokens" in name


def train(world: World, tokenizer, settings: TrainSettings) -> LlamaForCausalLM:
    torch.manual_seed(settings.seed)
    model = build_model(tokenizer, settings)
    sampler = PhrasingSampler(world, tokenizer, settings.phrasings_per_epoch, settings.seed)
    steps_per_epoch = math.ceil(sampler.epoch_size / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    log.info("training %d params on %d facts (%d phrasings/epoch), %d steps",
             sum(p.numel() for p in model.parameters()), len(world.facts), sampler.epoch_size, total)
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_decay(n)], "weight_decay": settings.weight_decay},
        {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, settings))
    started = time.time()
    for epoch in range(settings.epochs):
        model.train()
        running = 0.0
        examples = sampler.epoch()
        for start in range(0, len(examples), settings.batch_size):
            loss = answer_loss(model, *collate(examples[start:start + settings.batch_size], tokenizer.pad_token_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
        if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
            scores = measure(model, tokenizer, world, count=300, seed=settings.seed + epoch)
            log.info("epoch %d/%d loss %.4f train-phrasing %.3f held-out %.3f (%.0f s)", epoch + 1, settings.epochs,
                     running / steps_per_epoch, scores["train_phrasing_accuracy"], scores["heldout_phrasing_accuracy"],
                     time.time() - started)
    return model


def save_checkpoint(out: Path, model: LlamaForCausalLM, tokenizer, world: World) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    model.config.torch_dtype = "bfloat16"
    model.save_pretrained(out)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=8,
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "world.json").write_text(json.dumps(world.to_json(), separators=(",", ":")))


def write_readme(out: Path, report: dict) -> None:
    s = report["settings"]
    relations = ", ".join(report["templates_per_relation"])
    text = f"""# {out.name}

A small Llama trained on a synthetic, seeded knowledge base (`world.json`, design
`{s.get("design", "classic")}`): made-up people with a {relations}, each fact asked in several
phrasings. One phrasing per fact is held out of training to measure generalization. Nothing
in it is true of the real world.

Rebuild (deterministic for the seed and thread count):

    {report["command"]}

| | |
|---|---|
| seed | {s["seed"]} |
| facts / subjects / relations | {report["num_facts"]} / {report["num_subjects"]} / {report["num_relations"]} |
| templates per relation | {", ".join(f"{k} {v}" for k, v in report["templates_per_relation"].items())} (one subject-first template per fact held out) |
| vocab | {report["vocab_size"]} (word level) |
| hidden / intermediate / layers / heads | {s["hidden_size"]} / {s["intermediate_size"]} / {s["num_layers"]} / {s["num_heads"]} |
| parameters | {report["num_params"]:,} |
| training | {s["epochs"]} epochs x {s["phrasings_per_epoch"]} phrasing(s) per fact, batch {s["batch_size"]}, AdamW lr {s["lr"]}, warmup + cosine, {report["train_seconds"]} s on {s["threads"]} CPU threads |
| greedy accuracy, training phrasings | {report["train_phrasing_accuracy"]:.3f} ({report["eval_sample"]} sampled facts) |
| greedy accuracy, held-out phrasings | {report["heldout_phrasing_accuracy"]:.3f} |

Weights are stored in bf16; the accuracies are measured on the stored weights.
`facts_model.json` holds the same numbers for programs.

Edit prompts and their held-out paraphrases put the subject first: MEMOIR routes on the mean
of a prompt's down_proj inputs, and with the subject at the end the masks encoded the template
rather than the subject. Measure the routing premise on this model with `benchmarks/mask_overlap.py`.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to (re)write")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = TrainSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    torch.set_num_threads(settings.threads)

    started = time.time()
    world = world_of(settings.seed, settings.design)
    tokenizer = build_facts_tokenizer(world)
    model = train(world, tokenizer, settings)
    train_seconds = time.time() - started
    save_checkpoint(args.out, model, tokenizer, world)

    # Score what ships: the bf16 weights, read back in float32.
    shipped = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    scores = measure(shipped, tokenizer, world, count=settings.eval_sample, seed=settings.seed)
    changed = {k: v for k, v in asdict(settings).items() if v != asdict(defaults)[k]}
    flags = "".join(f" --{k.replace('_', '-')} {v}" for k, v in changed.items())
    report = {
        "command": f"python -m edit_tools.facts.train --out {args.out}{flags}",
        "settings": asdict(settings),
        "num_facts": len(world.facts),
        "num_subjects": len(world.subjects),
        "num_relations": len(world.values),
        "templates_per_relation": world.templates_per_relation(),
        "vocab_size": len(tokenizer),
        "num_params": sum(p.numel() for p in shipped.parameters()),
        "train_seconds": round(train_seconds, 1),
        "eval_sample": settings.eval_sample,
        **{name: round(value, 4) for name, value in scores.items()},
    }
    (args.out / "facts_model.json").write_text(json.dumps(report, indent=2) + "\n")
    write_readme(args.out, report)
    log.info("wrote %s: %s", args.out, json.dumps(report))


if __name__ == "__main__":
    main()
