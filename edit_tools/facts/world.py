"""A seeded synthetic knowledge base: made-up people, their facts, and the phrasings of each fact.

Nothing here is true of the real world, so a model trained on it knows exactly these facts
and an edit's effect can be measured against ground truth. The same seed always gives the
same world (Python's `random.Random` is stable across platforms for these calls).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokenizers import pre_tokenizers

from edit_tools.tiny_models import build_word_tokenizer

DEFAULT_SEED = 20506
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ message['content'] }} {% endif %}{% endfor %}"
)

# Syllables for made-up words; names and answer values are drawn from disjoint word pools.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th", "x"]


@dataclass(frozen=True)
class Template:
    text: str  # contains "{subject}"; the answer follows after a space
    is_question: bool

    @property
    def subject_first(self) -> bool:
        return self.text.startswith("{subject}")


@dataclass(frozen=True)
class Relation:
    name: str
    templates: tuple[Template, ...]


def _q(text: str) -> Template:
    return Template(text, is_question=True)


def _s(text: str) -> Template:
    return Template(text, is_question=False)


# Phrasings put the subject first and keep the wording short. MEMOIR routes on the mean of
# a prompt's down_proj inputs: tokens before the subject carry nothing of it, so a long
# template before the subject makes masks encode the template (measured; see
# benchmarks/mask_overlap.py). One subject-last question per relation is trained for realism
# but never held out nor used in edit sets.
RELATIONS: tuple[Relation, ...] = (
    Relation("home_city", (
        _q("{subject} lives in which city ?"),
        _s("{subject} lives in the city of"),
        _s("{subject} is a resident of"),
        _q("{subject} calls which city home ?"),
        _s("{subject} resides in"),
        _q("what is the home city of {subject} ?"),
    )),
    Relation("language", (
        _q("{subject} speaks which language ?"),
        _s("{subject} speaks fluent"),
        _s("{subject} grew up speaking"),
        _q("{subject} has which native language ?"),
        _s("{subject} writes letters in"),
        _q("what language does {subject} speak ?"),
    )),
    Relation("profession", (
        _q("{subject} has which profession ?"),
        _s("{subject} works as a"),
        _s("{subject} earns a living as a"),
        _q("{subject} does which job ?"),
        _s("{subject} is by profession a"),
        _q("what is the profession of {subject} ?"),
    )),
    Relation("employer", (
        _q("{subject} works for which company ?"),
        _s("{subject} is employed by"),
        _s("{subject} draws a salary from"),
        _q("{subject} has which employer ?"),
        _s("{subject} is on the payroll of"),
        _q("who is the employer of {subject} ?"),
    )),
)

# Professions are real words starting with a consonant, so "works as a" stays grammatical.
PROFESSIONS = (
    "baker", "pilot", "nurse", "farmer", "teacher", "lawyer", "painter", "sailor", "doctor", "chemist",
    "banker", "tailor", "carpenter", "dentist", "judge", "miner", "potter", "poet", "singer", "surgeon",
    "weaver", "writer", "builder", "cook", "gardener", "jeweler", "librarian", "mechanic", "plumber", "translator",
)


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str
    heldout_template: int  # index into the relation's templates; never trained on
    # The relation's phrasings (each world design has its own); not part of the fact's identity.
    templates: tuple[Template, ...] = field(default=(), compare=False, repr=False)

    def training_templates(self) -> list[int]:
        return [index for index in range(len(self.templates)) if index != self.heldout_template]

    def prompt(self, template_index: int) -> str:
        return self.templates[template_index].text.format(subject=self.subject)

    def is_subject_first(self, template_index: int) -> bool:
        return self.templates[template_index].subject_first

    def is_question(self, template_index: int) -> bool:
        return self.templates[template_index].is_question


@dataclass(frozen=True)
class MadeUpValues:
    """A relation's answers as made-up words: `count` of them, of these syllable counts."""
    count: int
    syllables: tuple[int, ...]
    suffix: str = ""


@dataclass(frozen=True)
class WorldDesign:
    """What a world is made of: relations and their phrasings, answer pools, how many people."""
    name: str
    relations: tuple[Relation, ...]
    values: dict  # relation -> tuple of real words, or MadeUpValues
    num_subjects: int
    num_facts: int
    num_first_names: int
    edit_set_sizes: tuple[int, ...] = (1, 10, 100, 1000)  # T of the edit sets drawn from it

    def relation(self, name: str) -> Relation:
        return next(r for r in self.relations if r.name == name)


@dataclass
class World:
    seed: int
    subjects: list[str]
    facts: list[Fact]
    values: dict[str, list[str]] = field(default_factory=dict)  # relation -> its possible answers
    design: WorldDesign | None = None

    def relation(self, name: str) -> Relation:
        return self.design.relation(name)

    def facts_of(self, subject: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.subject == subject]

    def templates_per_relation(self) -> dict[str, int]:
        return {r.name: len(r.templates) for r in self.design.relations if r.name in self.values}

    def to_json(self) -> dict:
        data = {
            "seed": self.seed,
            "values": self.values,
            "relations": {r.name: [{"text": t.text, "is_question": t.is_question} for t in r.templates]
                          for r in self.design.relations},
            "facts": [[f.subject, f.relation, f.answer, f.heldout_template] for f in self.facts],
        }
        if self.design.name != CLASSIC.name:  # the classic world.json predates designs
            data["design"] = self.design.name
        return data


def _made_up_word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return "".join(parts) + rng.choice(_CODAS)


def _word_pool(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, ...]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = _made_up_word(rng, rng.choice(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


CLASSIC = WorldDesign(
    name="classic",
    relations=RELATIONS,
    values={
        "home_city": MadeUpValues(40, (2, 3)),
        "language": MadeUpValues(24, (1, 2), suffix="ish"),
        "profession": PROFESSIONS,
        "employer": MadeUpValues(40, (2,)),
    },
    num_subjects=1200,
    num_facts=1600,
    num_first_names=150,
)


def generate_world(seed: int = DEFAULT_SEED, design: WorldDesign = CLASSIC) -> World:
    """Subjects named "<first> <middle> <surname>" (first and middle names shared, surnames unique). Every subject
    has one fact, and random subjects get further facts (other relations) up to the design's
    `num_facts`; answers are drawn uniformly from independent value pools."""
    relations = design.relations
    num_subjects, num_facts = design.num_subjects, design.num_facts
    if not num_subjects <= num_facts <= num_subjects * len(relations):
        raise ValueError(f"num_facts={num_facts} must be in {num_subjects}..{num_subjects * len(relations)}")
    rng = random.Random(seed)
    # Made-up words must never collide with a template word or a real-word answer.
    real_words = {word for pool in design.values.values() if not isinstance(pool, MadeUpValues) for word in pool}
    taken = real_words | {word for r in relations for t in r.templates for word in t.text.split()}
    values = {}
    for relation in relations:  # in the relations' order: the classic world's draws depend on it
        pool = design.values[relation.name]
        if isinstance(pool, MadeUpValues):
            values[relation.name] = [word + pool.suffix for word in _word_pool(rng, pool.count, taken, pool.syllables)]
        else:
            values[relation.name] = list(pool)
    first_names = _word_pool(rng, design.num_first_names, taken, (1, 2))
    middle_names = _word_pool(rng, design.num_first_names, taken, (1, 2))
    surnames = _word_pool(rng, num_subjects, taken, (2, 3))
    # Three-word names: the more of a prompt is subject, the more its mask is about the subject.
    subjects = [f"{rng.choice(first_names)} {rng.choice(middle_names)} {surname}" for surname in surnames]
    # Relation order per subject is fixed up front; subject i gets the first n_i of its list.
    relation_orders = [rng.sample(relations, len(relations)) for _ in subjects]
    counts = [1] * num_subjects
    while sum(counts) < num_facts:
        index = rng.randrange(num_subjects)
        if counts[index] < len(relations):
            counts[index] += 1
    facts = []
    for subject, order, count in zip(subjects, relation_orders, counts):
        for relation in order[:count]:
            facts.append(Fact(
                subject=subject,
                relation=relation.name,
                answer=rng.choice(values[relation.name]),
                heldout_template=rng.choice([i for i, t in enumerate(relation.templates) if t.subject_first]),
                templates=relation.templates,
            ))
    return World(seed=seed, subjects=subjects, facts=facts, values=values, design=design)


def vocabulary(world: World) -> list[str]:
    """Every word and punctuation mark a prompt or answer of the world can contain."""
    texts = [t.text.replace("{subject}", " ") for r in world.design.relations for t in r.templates]
    texts += world.subjects
    texts += [value for pool in world.values.values() for value in pool]
    splitter = pre_tokenizers.Whitespace()  # the tokenizer's own pre-tokenizer, so nothing is missed
    seen: dict[str, None] = {}
    for text in texts:
        for piece, _ in splitter.pre_tokenize_str(text):
            seen.setdefault(piece, None)
    return list(seen)


def build_facts_tokenizer(world: World):
    """The project's word-level tokenizer over the world's words: each answer is one token.

    The chat template passes the user's words through as-is (after <s>): the model was trained
    on bare questions, so a chat turn must look like one.
    """
    tokenizer = build_word_tokenizer(vocabulary(world))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 64
    return tokenizer
