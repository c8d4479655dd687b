"""The project's own offline corpus: short children's stories from a seeded grammar.

Written for llamaforge (no third-party text), so `llamaforge quickstart` trains with no network and no data
files. The grammar varies characters, places, objects, goals, problems, helpers and endings and ties them
together with pronouns and callbacks, so a small model has real structure to learn; the same seed always gives
the same stories.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

NAMES = [
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Sam", "he"),
    ("Zoe", "she"),
    ("Max", "he"),
    ("Lily", "she"),
    ("Ben", "he"),
    ("Ella", "she"),
    ("Tom", "he"),
    ("Nora", "she"),
    ("Finn", "he"),
    ("Ruby", "she"),
    ("Jack", "he"),
    ("Ivy", "she"),
    ("Omar", "he"),
    ("Lucy", "she"),
    ("Theo", "he"),
    ("Rosa", "she"),
    ("Kai", "he"),
]
ANIMALS = [
    "cat",
    "dog",
    "rabbit",
    "duck",
    "fox",
    "bear",
    "owl",
    "frog",
    "mouse",
    "turtle",
    "bird",
    "puppy",
    "kitten",
    "squirrel",
    "goat",
    "pony",
]
ADJ = ["little", "big", "happy", "sleepy", "brave", "shy", "funny", "kind", "curious", "tiny", "old", "quick"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "brown", "golden"]
PLACES = [
    ("the park", "under a tall tree"),
    ("the beach", "near the water"),
    ("the garden", "by the flowers"),
    ("the forest", "behind a big rock"),
    ("the farm", "in the barn"),
    ("the school", "in the yard"),
    ("the town", "on the street"),
    ("the lake", "on the shore"),
    ("the hill", "at the top"),
    ("the kitchen", "under the table"),
]
OBJECTS = [
    "ball",
    "kite",
    "hat",
    "box",
    "book",
    "toy boat",
    "shell",
    "cup",
    "blanket",
    "drum",
    "map",
    "key",
    "flower",
    "apple",
    "cake",
    "balloon",
    "shoe",
    "bell",
]
FEELINGS_GOOD = ["happy", "glad", "proud", "excited", "calm"]
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely"]
HIDING = ["in the grass", "behind a box", "under a bed", "near the door"]
ELDERS = ["mom", "dad", "grandma", "grandpa"]
WEATHER = [
    "The sun was warm.",
    "It was a windy day.",
    "Rain fell softly.",
    "The sky was very blue.",
    "Snow covered the ground.",
    "It was a quiet morning.",
]


def _a(phrase: str) -> str:
    """The phrase with its indefinite article ("an old cat", "a red ball")."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _obj(rng: random.Random) -> str:
    return f"{rng.choice(COLOURS)} {rng.choice(OBJECTS)}"


def story(rng: random.Random) -> str:
    """One story: setting, a want or a problem, an attempt, help, resolution, a closing line."""
    name, pro = rng.choice(NAMES)
    poss = "her" if pro == "she" else "his"
    friend, _ = rng.choice([n for n in NAMES if n[0] != name])
    animal = f"{rng.choice(ADJ)} {rng.choice(ANIMALS)}"
    place, spot = rng.choice(PLACES)
    thing = _obj(rng)
    cap = pro.capitalize()
    kid = "girl" if pro == "she" else "boy"
    obj_pro = "her" if pro == "she" else "him"
    opening = rng.choice(
        [
            f"Once upon a time, there was {_a(rng.choice(ADJ))} {rng.choice([kid, 'child'])} named {name}.",
            f"One day, {name} went to {place}.",
            f"{name} lived in a small house near {place}.",
            f"There was {_a(animal)} who lived at {place}. Its best friend was {name}.",
        ]
    )
    lines = [opening, rng.choice(WEATHER)]
    kind = rng.randrange(7)
    if kind == 0:  # something lost
        lines += [
            f"{name} had {_a(thing)}. {cap} loved it very much.",
            f"But one day, the {thing} was gone! {name} felt {rng.choice(FEELINGS_BAD)}.",
            f"{cap} looked {spot}, but it was not there.",
            f'Then {friend} came and said, "I will help you look."',
            f"They looked together. At last, {friend} found the {thing} {rng.choice(HIDING)}.",
            f'{name} said, "Thank you, {friend}!" {cap} was very {rng.choice(FEELINGS_GOOD)}.',
        ]
    elif kind == 1:  # an animal in trouble
        lines += [
            f"At {place}, {name} saw {_a(animal)}. The {animal.split()[-1]} was stuck {spot}.",
            f'"Do not be scared," said {name}. {cap} moved slowly and was very gentle.',
            f"{cap} pulled and pulled. Then the {animal.split()[-1]} was free!",
            f"The {animal.split()[-1]} jumped and played with {name} all day.",
            "From that day on, they were best friends.",
        ]
    elif kind == 2:  # learning to share
        lines += [
            f"{name} and {friend} both wanted to play with the {thing}.",
            f'"It is mine!" said {name}. {friend} felt {rng.choice(FEELINGS_BAD)} and sat down.',
            f'Then {name} thought about it. {cap} gave the {thing} to {friend} and said, "Let us play together."',
            "They took turns. It was more fun to play together.",
            f"{name} learned that sharing makes friends {rng.choice(FEELINGS_GOOD)}.",
        ]
    elif kind == 4:  # a fear overcome
        fear = rng.choice(["the dark", "the thunder", "the big dog next door", "the deep water", "the tall slide"])
        lines += [
            f"{name} was afraid of {fear}. When {pro} thought about it, {pro} felt {rng.choice(FEELINGS_BAD)}.",
            f'{poss.capitalize()} {rng.choice(ELDERS)} held {poss} hand and said, "Being brave means trying, '
            f'even when you are scared."',
            f"{name} took a deep breath. {cap} counted to three.",
            f"It was not so bad after all! {name} smiled and felt {rng.choice(FEELINGS_GOOD)}.",
            f"Now {name} is not afraid of {fear} anymore.",
        ]
    elif kind == 5:  # helping at home
        dish = rng.choice(["a cake", "some cookies", "warm soup", "a pie", "bread"])
        elder = rng.choice(ELDERS)
        lines += [
            f"{name} wanted to help {poss} {elder} make {dish}.",
            f"They put on aprons. {name} mixed and {poss} {elder} poured.",
            f"Oops! {name} spilled the flour on the floor. Everything was white, even {poss} nose!",
            f'{poss.capitalize()} {elder} laughed. "It is okay. We can clean it up together."',
            f"When {dish} was ready, it smelled so good. They shared it with {friend}.",
            f"{friend} said it was the best {dish.split()[-1]} ever, and {name} felt {rng.choice(FEELINGS_GOOD)}.",
        ]
    elif kind == 6:  # a surprise found on a walk
        found = _obj(rng)
        owner = f"{rng.choice(ADJ)} {rng.choice(ANIMALS)}"
        lines += [
            f"{name} and {friend} went for a walk to {place}.",
            f'{spot.capitalize()}, they found {_a(found)}. "Whose is this?" asked {friend}.',
            f'They asked everyone they met. At last {_a(owner)} said, "It is mine!"',
            f"The {owner.split()[-1]} had lost the {found.split()[-1]} that morning. "
            f"It was so {rng.choice(FEELINGS_GOOD)} to have it back.",
            f"{name} and {friend} felt warm inside. Helping others made them {rng.choice(FEELINGS_GOOD)} too.",
        ]
    else:  # a wish and hard work
        goal = rng.choice(
            [
                "climb the hill",
                "build a tall tower",
                "ride a bike",
                "bake a cake",
                "fly a kite",
                "swim in the lake",
                "read a big book",
            ]
        )
        lines += [
            f"{name} wanted to {goal}. {cap} tried, but it was hard.",
            f"{cap} fell down and felt {rng.choice(FEELINGS_BAD)}.",
            f'{poss.capitalize()} {rng.choice(ELDERS)} said, "Try again. You can do it," and gave {obj_pro} a hug.',
            f"So {name} tried again, and again. Every day {pro} got a little better.",
            f"At last, {name} could {goal}! {cap} was so {rng.choice(FEELINGS_GOOD)}.",
        ]
    lines.append(
        rng.choice(
            [
                f"That night, {name} went to sleep with a big smile.",
                f"{name} never forgot that day at {place}.",
                "The end.",
                f"And {name} and {friend} played until the sun went down.",
            ]
        )
    )
    return " ".join(lines)


def generate_corpus(n_stories: int = 4000, seed: int = 0) -> Iterator[str]:
    """`n_stories` stories, deterministic for a given seed."""
    rng = random.Random(seed)
    for _ in range(n_stories):
        yield story(rng)


def write_corpus(path: str | Path, n_stories: int = 4000, seed: int = 0) -> Path:
    """The corpus as a text file, one story per line (what `--data` reads)."""
    from llamaforge.core.io import atomic_write_text

    atomic_write_text(path, "\n".join(generate_corpus(n_stories, seed)) + "\n")
    return Path(path)
