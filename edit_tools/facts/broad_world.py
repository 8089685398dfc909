"""The broad world design: enough people for 10,000 edits, and many phrasings of each fact.

Built for MEMOIR's routing premise (issue 13): a prompt's mask should say who it is about,
so that a paraphrase finds its edit and a question about someone else does not. Compared with
the classic design: six relations instead of four, sixteen phrasings per relation in question
and statement form with the subject first and last (and in different words, not only other
word orders), 10,600 people (10,000 to edit, the rest for locality prompts).
"""

from __future__ import annotations

from edit_tools.facts.world import PROFESSIONS, MadeUpValues, Relation, Template, WorldDesign


def _relation(name: str, questions_first, statements_first, questions_last, statements_last) -> Relation:
    templates = [Template(text, is_question=True) for text in questions_first]
    templates += [Template(text, is_question=False) for text in statements_first]
    templates += [Template(text, is_question=True) for text in questions_last]
    templates += [Template(text, is_question=False) for text in statements_last]
    return Relation(name, tuple(templates))


RELATIONS = (
    _relation(
        "home_city",
        ["{subject} lives in which city ?", "{subject} resides in which city ?",
         "{subject} calls which city home ?", "{subject} was raised in which town ?"],
        ["{subject} lives in", "{subject} resides in the city of", "{subject} has a house in",
         "{subject} 's home town is", "{subject} spends most days in", "{subject} , the neighbour , lives in"],
        ["which city does {subject} live in ?", "what is the home city of {subject} ?",
         "in which town does {subject} reside ?"],
        ["the home town of {subject} is", "if you visit {subject} , you go to",
         "everyone knows that {subject} lives in"],
    ),
    _relation(
        "language",
        ["{subject} speaks which language ?", "{subject} has which native language ?",
         "{subject} writes letters in which language ?", "{subject} was raised speaking which tongue ?"],
        ["{subject} speaks fluent", "{subject} grew up speaking", "{subject} writes poems in",
         "{subject} 's mother tongue is", "{subject} dreams in", "{subject} reads the news in"],
        ["which language does {subject} speak ?", "what is the native language of {subject} ?",
         "in which language does {subject} write ?"],
        ["the mother tongue of {subject} is", "when at home , {subject} speaks",
         "everyone knows that {subject} speaks"],
    ),
    _relation(
        "profession",
        ["{subject} has which profession ?", "{subject} does which job ?",
         "{subject} trained for which career ?", "{subject} earns money in which trade ?"],
        ["{subject} works as a", "{subject} earns a living as a", "{subject} is by profession a",
         "{subject} 's job title is", "{subject} trained to be a", "{subject} was hired as a"],
        ["what is the profession of {subject} ?", "which job does {subject} do ?",
         "what does {subject} do for a living ?"],
        ["the job of {subject} is", "by trade , {subject} is a", "everyone knows that {subject} works as a"],
    ),
    _relation(
        "employer",
        ["{subject} works for which company ?", "{subject} has which employer ?",
         "{subject} draws a salary from which firm ?", "{subject} is on the staff of which company ?"],
        ["{subject} is employed by", "{subject} draws a salary from", "{subject} is on the payroll of",
         "{subject} 's employer is", "{subject} reports to the managers of", "{subject} signed a contract with"],
        ["who is the employer of {subject} ?", "which company does {subject} work for ?",
         "for which firm does {subject} work ?"],
        ["the employer of {subject} is", "every morning , {subject} goes to work at",
         "everyone knows that {subject} works for"],
    ),
    _relation(
        "instrument",
        ["{subject} plays which instrument ?", "{subject} practises which instrument ?",
         "{subject} performs on which instrument ?", "{subject} took lessons on which instrument ?"],
        ["{subject} plays the", "{subject} practises the", "{subject} performs on the",
         "{subject} 's instrument is the", "{subject} owns a battered", "{subject} learned to play the"],
        ["which instrument does {subject} play ?", "what instrument does {subject} practise ?",
         "on which instrument does {subject} perform ?"],
        ["the instrument of {subject} is the", "in the band , {subject} plays the",
         "everyone knows that {subject} plays the"],
    ),
    _relation(
        "sport",
        ["{subject} plays which sport ?", "{subject} trains for which sport ?",
         "{subject} competes in which sport ?", "{subject} watches which sport ?"],
        ["{subject} plays", "{subject} trains at", "{subject} competes in",
         "{subject} 's favourite sport is", "{subject} spends weekends at", "{subject} won a medal in"],
        ["which sport does {subject} play ?", "what sport does {subject} train for ?",
         "in which sport does {subject} compete ?"],
        ["the sport of {subject} is", "on saturdays , {subject} plays", "everyone knows that {subject} plays"],
    ),
)

INSTRUMENTS = (
    "violin", "piano", "flute", "drums", "harp", "cello", "trumpet", "guitar", "oboe", "banjo", "clarinet",
    "organ", "accordion", "trombone", "saxophone", "ukulele",
)
SPORTS = (
    "tennis", "chess", "rugby", "cricket", "hockey", "golf", "rowing", "fencing", "archery", "boxing",
    "sailing", "skiing", "judo", "polo", "squash", "badminton",
)

BROAD = WorldDesign(
    name="broad",
    relations=RELATIONS,
    values={
        "home_city": MadeUpValues(80, (2, 3)),
        "language": MadeUpValues(40, (1, 2), suffix="ish"),
        "profession": PROFESSIONS,
        "employer": MadeUpValues(80, (2,)),
        "instrument": INSTRUMENTS,
        "sport": SPORTS,
    },
    num_subjects=10600,
    num_facts=11000,
    num_first_names=300,
    edit_set_sizes=(1, 10, 100, 1000, 10000),
)
