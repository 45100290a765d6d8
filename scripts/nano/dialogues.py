"""Generated training text that the books do not have: short dialogues in the V4 chat encoding (so
`ds4py chat` and `serve` have something to imitate) and simple "Once upon a time" stories. Everything
comes from the fixed tables below and the address file names, drawn with a seeded random.Random."""

from __future__ import annotations

import random

from ds4py.chat import encode_chat

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "England": "London", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Egypt": "Cairo",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima",
    "Chile": "Santiago", "Kenya": "Nairobi", "Turkey": "Ankara", "Iran": "Tehran", "Thailand": "Bangkok",
    "Australia": "Canberra", "the United States": "Washington", "Hungary": "Budapest", "Cuba": "Havana",
}
COLORS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a ripe banana": "yellow",
          "a ripe tomato": "red", "an orange": "orange", "the sea on a clear day": "blue", "milk": "white"}
ANIMALS = {"whale": "the sea", "camel": "the desert", "polar bear": "the Arctic", "monkey": "the forest",
           "penguin": "the Antarctic", "fish": "the water", "eagle": "the mountains", "cow": "the farm"}
BOOK_FACTS = [
    ("Who wrote Moby Dick?", "Moby Dick was written by Herman Melville and published in 1851."),
    ("Who is the narrator of Moby Dick?", "The narrator of Moby Dick is Ishmael. The book begins: Call me Ishmael."),
    ("Who is the captain of the Pequod?", "The captain of the Pequod is Ahab."),
    ("What is the white whale called?", "The white whale is called Moby Dick."),
    ("What is the State of the Union address?",
     "The State of the Union address is a message from the President of the United States to Congress "
     "about the condition of the nation."),
    ("Who are you?", "I am a very small language model. I learned English from old speeches and from Moby Dick."),
    ("What can you do?", "I can continue a piece of text and answer simple questions. I am small, so I make mistakes."),
]
GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi", "Hi! What would you like to talk about?"),
             ("Good morning.", "Good morning! How can I help you?"), ("Thank you!", "You are welcome."),
             ("Thanks for your help.", "You are welcome. Have a good day!"), ("Goodbye.", "Goodbye!")]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Max", "Sara"]
CREATURES = [("whale", "sea"), ("cat", "house"), ("dog", "garden"), ("bird", "tree"), ("fox", "forest"),
             ("sailor", "ship"), ("rabbit", "field"), ("fish", "river")]
WANTS = ["to see the world", "to find a friend", "to learn to sing", "to build a boat", "to climb a hill",
         "to find the white whale", "to visit the city", "to catch a star"]


def president_years(address_files: list[str]) -> dict[int, str]:
    from corpus import president

    return dict(president(n) for n in address_files)


def exchange(r: random.Random, presidents: dict[int, str]) -> tuple[str, str, str]:
    """(question, reasoning, answer) of one kind chosen at random."""
    kind = r.randrange(7)
    if kind == 0:
        country = r.choice(list(CAPITALS))
        q = r.choice(["What is the capital of {}?", "Which city is the capital of {}?", "Tell me the capital of {}."])
        return q.format(country), f"The question asks for the capital of {country}.", \
            f"The capital of {country} is {CAPITALS[country]}."
    if kind == 1:
        a, b = r.randrange(11), r.randrange(11)
        if r.random() < 0.5:
            return f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}."
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} - {b} = {a - b}.", f"{a} minus {b} is {a - b}."
    if kind == 2:
        year = r.choice(list(presidents))
        q = r.choice(["Who was the President of the United States in {}?",
                      "Who gave the State of the Union address in {}?"])
        return q.format(year), f"The State of the Union address of {year} was given by {presidents[year]}.", \
            f"In {year} the President was {presidents[year]}."
    if kind == 3:
        thing = r.choice(list(COLORS))
        return f"What color is {thing}?", f"{thing.capitalize()} is {COLORS[thing]}.", \
            f"{thing[0].upper() + thing[1:]} is {COLORS[thing]}."
    if kind == 4:
        animal = r.choice(list(ANIMALS))
        return f"Where does a {animal} live?", f"A {animal} lives in {ANIMALS[animal]}.", \
            f"A {animal} usually lives in {ANIMALS[animal]}."
    if kind == 5:
        q, a = r.choice(BOOK_FACTS)
        return q, "This is a question about a fact I know.", a
    n = r.randrange(1, 10)
    return f"How do you spell the number {n}?", f"The number {n} is written {NUMBERS[n]}.", \
        f"The number {n} is spelled {'-'.join(NUMBERS[n].upper())}."


def dialogue(r: random.Random, presidents: dict[int, str]) -> str:
    messages = []
    if r.random() < 0.15:
        messages.append({"role": "system", "content": r.choice(["You are a helpful assistant.", "Answer briefly."])})
    if r.random() < 0.3:
        q, a = r.choice(GREETINGS)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    thinking = r.random() < 0.2
    for _ in range(r.choice([1, 1, 2, 3])):
        q, why, a = exchange(r, presidents)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a, "reasoning_content": why}]
    # the last answer keeps its reasoning when thinking is on (as the chat encoding does), earlier ones drop it
    return encode_chat(messages, thinking=thinking, add_generation_prompt=False)


def story(r: random.Random) -> str:
    name, (creature, home), want = r.choice(NAMES), r.choice(CREATURES), r.choice(WANTS)
    friend, (other, _) = r.choice([n for n in NAMES if n != name]), r.choice(CREATURES)
    return (f"Once upon a time there was a little {creature} named {name}. {name} lived in a {home} and wanted "
            f"{want}. One day {name} met a {other} named {friend}. \"Will you help me?\" asked {name}. "
            f"\"Yes,\" said {friend}. So they went together, and after a long day they did it. "
            f"{name} was very happy, and {name} and {friend} were friends from that day on.")


def generate(seed: int, dialogues: int, stories: int, address_files: list[str]) -> list[str]:
    r = random.Random(seed)
    presidents = president_years(address_files)
    docs = [dialogue(r, presidents) for _ in range(dialogues)] + [story(r) for _ in range(stories)]
    r.shuffle(docs)
    return docs
