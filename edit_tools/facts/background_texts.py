"""Background texts for a facts world: questions and statements about people the world does not have.

    python -m edit_tools.facts.background_texts --out data/facts/background.txt
    python -m edit_tools.facts.background_texts --out data/facts/broad/background.txt --design broad --seed 11

Each line is one phrasing (any relation, any template, question or statement form) about a
made-up person whose first, middle and last names are the world's words recombined: every
word is one the model's tokenizer knows, and no line names anyone an edit set edits or asks
about. The background's mean and principal directions (`background_components`) then describe
how the world's phrasings vary, not any subject the benchmarks evaluate.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

from edit_tools.facts.designs import DESIGNS, world_of
from edit_tools.facts.world import CLASSIC, DEFAULT_SEED, World

log = logging.getLogger(__name__)


def stranger_names(world: World, count: int, rng: random.Random) -> list[str]:
    """`count` distinct three-word names made of the world's name words, none a world subject."""
    parts = [name.split() for name in world.subjects]
    firsts, middles, lasts = ([p[i] for p in parts] for i in range(3))
    taken, names = set(world.subjects), []
    if count > len(firsts) * len(lasts) // 2:
        raise ValueError(f"{count} made-up names is too many for a world of {len(world.subjects)} subjects")
    while len(names) < count:
        name = f"{rng.choice(firsts)} {rng.choice(middles)} {rng.choice(lasts)}"
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def background_prompts(world: World, count: int, seed: int) -> list[str]:
    """`count` prompts, each a random relation and phrasing about a different made-up person."""
    rng = random.Random(seed)
    relations = [r for r in world.design.relations if r.name in world.values]
    prompts = []
    for name in stranger_names(world, count, rng):
        template = rng.choice(rng.choice(relations).templates)
        prompts.append(template.text.format(subject=name))
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="text file to write, one prompt per line")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed (as used to train the model)")
    parser.add_argument("--design", default=CLASSIC.name, choices=sorted(DESIGNS), help="world design")
    parser.add_argument("--count", type=int, default=4000, help="how many prompts (default 4000)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.count < 1:
        raise SystemExit(f"--count {args.count}: expected at least 1 prompt")
    world = world_of(args.seed, args.design)
    # Its own draws: a seed apart from the world's and the edit sets' (seed + 1).
    prompts = background_prompts(world, args.count, seed=args.seed + 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("\n".join(prompts) + "\n")
    tmp.replace(args.out)
    log.info("wrote %d prompts to %s", len(prompts), args.out)


if __name__ == "__main__":
    main()
