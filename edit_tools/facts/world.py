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
RELATION_BY_NAME = {relation.name: relation for relation in RELATIONS}

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

    def training_templates(self) -> list[int]:
        count = len(RELATION_BY_NAME[self.relation].templates)
        return [index for index in range(count) if index != self.heldout_template]

    def prompt(self, template_index: int) -> str:
        return RELATION_BY_NAME[self.relation].templates[template_index].text.format(subject=self.subject)

    def is_subject_first(self, template_index: int) -> bool:
        return RELATION_BY_NAME[self.relation].templates[template_index].subject_first

    def is_question(self, template_index: int) -> bool:
        return RELATION_BY_NAME[self.relation].templates[template_index].is_question


@dataclass
class World:
    seed: int
    subjects: list[str]
    facts: list[Fact]
    values: dict[str, list[str]] = field(default_factory=dict)  # relation -> its possible answers

    @staticmethod
    def relation(name: str) -> Relation:
        return RELATION_BY_NAME[name]

    def facts_of(self, subject: str) -> list[Fact]:
        return [fact for fact in self.facts if fact.subject == subject]

    def templates_per_relation(self) -> dict[str, int]:
        return {r.name: len(r.templates) for r in RELATIONS if r.name in self.values}

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "values": self.values,
            "relations": {r.name: [{"text": t.text, "is_question": t.is_question} for t in r.templates] for r in RELATIONS},
            "facts": [[f.subject, f.relation, f.answer, f.heldout_template] for f in self.facts],
        }


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


def generate_world(
    seed: int = DEFAULT_SEED,
    num_subjects: int = 1200,
    num_facts: int = 1600,
    num_first_names: int = 150,
    num_cities: int = 40,
    num_languages: int = 24,
    num_employers: int = 40,
) -> World:
    """Subjects named "<first> <middle> <surname>" (first and middle names shared, surnames unique). Every subject
    has one fact, and random subjects get further facts (other relations) up to `num_facts`;
    answers are drawn uniformly from independent value pools."""
    if not num_subjects <= num_facts <= num_subjects * len(RELATIONS):
        raise ValueError(f"num_facts={num_facts} must be in {num_subjects}..{num_subjects * len(RELATIONS)}")
    rng = random.Random(seed)
    # Made-up words must never collide with a template word or a profession.
    taken = set(PROFESSIONS) | {word for r in RELATIONS for t in r.templates for word in t.text.split()}
    values = {
        "home_city": _word_pool(rng, num_cities, taken, (2, 3)),
        "language": [word + "ish" for word in _word_pool(rng, num_languages, taken, (1, 2))],
        "profession": list(PROFESSIONS),
        "employer": _word_pool(rng, num_employers, taken, (2,)),
    }
    first_names = _word_pool(rng, num_first_names, taken, (1, 2))
    middle_names = _word_pool(rng, num_first_names, taken, (1, 2))
    surnames = _word_pool(rng, num_subjects, taken, (2, 3))
    # Three-word names: the more of a prompt is subject, the more its mask is about the subject.
    subjects = [f"{rng.choice(first_names)} {rng.choice(middle_names)} {surname}" for surname in surnames]
    # Relation order per subject is fixed up front; subject i gets the first n_i of its list.
    relation_orders = [rng.sample(RELATIONS, len(RELATIONS)) for _ in subjects]
    counts = [1] * num_subjects
    while sum(counts) < num_facts:
        index = rng.randrange(num_subjects)
        if counts[index] < len(RELATIONS):
            counts[index] += 1
    facts = []
    for subject, order, count in zip(subjects, relation_orders, counts):
        for relation in order[:count]:
            facts.append(Fact(
                subject=subject,
                relation=relation.name,
                answer=rng.choice(values[relation.name]),
                heldout_template=rng.choice([i for i, t in enumerate(relation.templates) if t.subject_first]),
            ))
    return World(seed=seed, subjects=subjects, facts=facts, values=values)


def vocabulary(world: World) -> list[str]:
    """Every word and punctuation mark a prompt or answer of the world can contain."""
    texts = [t.text.replace("{subject}", " ") for r in RELATIONS for t in r.templates]
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
