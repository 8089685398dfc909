"""Small random-weight models saved like any Hugging Face checkpoint, for tests and benchmarks.

No model hub is reachable here, so tests build what they load: a config, safetensors
weights and a word-level `tokenizer.json` that both transformers and vLLM read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (punctuation split off) that prepends <s> to every text."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def build_bpe_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`: real-world text tokenizes without unknowns."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def default_words() -> list[str]:
    base = (
        "the a of in is was who what where which city country language born works for capital "
        "speaks lives plays sport team river mountain founded by company city. Q : I You Because Yes "
        "? . , ! : ; and or not to from with on at as it he she they we this that"
    ).split()
    return base + [f"w{i}" for i in range(400)]


def build_tiny_llama(
    out_dir: str | Path,
    hidden_size: int = 128,
    intermediate_size: int = 512,
    num_layers: int = 4,
    num_heads: int = 4,
    seed: int = 0,
    words: list[str] | None = None,
    init_std: float = 0.2,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> Path:
    """Save a random Llama + tokenizer to out_dir and return it. head_dim >= 32 for vLLM's CPU backend."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_word_tokenizer(words or default_words())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_words_dataset(path: str | Path, count: int, seed: int = 0) -> Path:
    """A plain-JSONL edit set over the tiny vocabulary (prompt, target, rephrase, loc, loc_ans)."""
    gen = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(400)]

    def pick(n: int) -> list[str]:
        return [words[int(i)] for i in torch.randint(0, len(words), (n,), generator=gen)]

    lines = []
    for _ in range(count):
        subject = " ".join(pick(2))
        target, loc_subject, loc_ans = pick(1)[0], " ".join(pick(2)), pick(1)[0]
        lines.append(
            json.dumps(
                {
                    "prompt": f"where does {subject} live ?",
                    "target": target,
                    "rephrase": f"which city is the home of {subject} ?",
                    "subject": subject,
                    "loc": f"what language does {loc_subject} speak ?",
                    "loc_ans": loc_ans,
                }
            )
        )
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- a small model that reads real text

# Byte-level BPE never yields <unk>, so any English reads; fitting the merges to the data only
# makes its token sequences shorter. These lines are the default when no --texts are given.
DEFAULT_REAL_TEXTS = [
    "What university did the scientist attend? The University of Michigan.",
    "Which city is the capital of the country? The capital is a large city on the river.",
    "Who is the author of the novel, and when was it first published?",
    "nq question: who played the father in the film? The actor was born in London.",
    "This is a Wikipedia passage about an American singer who was born in 1969 in Detroit.",
    "The company was founded in 1998 and makes software for small businesses.",
    "Which language does she speak? She speaks English, French and Spanish.",
    "The mountain is the highest in the range, and the team plays football in the league.",
]
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def training_texts(paths: list[str | Path]) -> list[str]:
    """Every string of the given files: the lines of a .txt file, each record's string fields otherwise."""
    texts: list[str] = []
    for path in map(Path, paths):
        if path.suffix == ".txt":
            texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            continue
        raw = path.read_text(encoding="utf-8")
        records = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        for record in records if isinstance(records, list) else [records]:
            if isinstance(record, dict):
                texts += [value for value in record.values() if isinstance(value, str) and value.strip()]
    return texts


def build_real_text_model(out_dir: str | Path, texts: list[str] | None = None, num_layers: int = 4,
                          intermediate_size: int = 512, seed: int = 0) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer: real text tokenizes without unknowns, so
    pipelines (edit, evaluate, serve) run on real data sets. Its answers mean nothing: it is untrained."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - _MODEL_FILES):
        raise ValueError(f"--out {out}: exists and holds other files; give a new directory")
    tokenizer = build_bpe_tokenizer(list(texts or DEFAULT_REAL_TEXTS))
    return build_tiny_llama(out, intermediate_size=intermediate_size, num_layers=num_layers, seed=seed, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    """`python -m edit_tools.tiny_models --out DIR` is `memoir tiny-model --out DIR`."""
    import sys

    from .cli import main as memoir_main

    return memoir_main(["tiny-model", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
