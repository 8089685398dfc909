"""The embedded facts model: a seeded synthetic world, the small Llama trained on it, and edit sets.

    world.py      made-up people, relations, phrasings (one held out per fact), tokenizer
    train.py      fit and save models/facts-llama (python -m edit_tools.facts.train --out ...)
    answers.py    greedy answers and accuracy, the probe shared by training and tests
    edit_sets.py  ZsRE-format edit sets from the world (python -m edit_tools.facts.edit_sets --out ...)
"""
