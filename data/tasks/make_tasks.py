"""Write the production recipes' tasks: training prompts and a golden set for each, generated (seeded), so that
each recipe is a sound experiment to copy: its own prompts, the checks its task needs, a golden set of the same
task that shares no template, name or item with the prompts (the recipes' `contamination` check confirms it).

    python data/tasks/make_tasks.py     # rewrites data/tasks/*/

- math/     arithmetic word problems, the answer a number (`reference` check in number mode; eval `number`);
            openai-gpt4o-to-llama3b.yaml
- tickets/  support messages triaged to {"category", "priority"} JSON (structured output, `reference` in json
            mode; eval `json_match`); anthropic-claude-to-llama3b.yaml
- reviews/  product reviews labelled positive / negative / neutral, read as a dataset (text and label
            columns; `reference` normalized; eval `normalized`); vllm-70b-distill-to-llama3b.yaml
- explain/  a golden set for the batch recipe's grid (explanations of topics the grid does not hold, scored by
            a judge); openai-batch-100k.yaml
- capitals/ a low-data short-answer task on the base model's own knowledge (a country's capital, the city's
            name only; `reference` normalized; eval `normalized`): 45 training prompts, 50 golden questions about
            other countries; benchmarks/on_policy.py --task capitals
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TRAIN_NAMES = "Maria Ahmed Lena Tom Yuki Carlos Priya Olga Kwame Sofia Jonas Amara Diego Mei Ivan Fatima".split()
GOLDEN_NAMES = "Sakura Kofi Beatriz Anders Leila Dmitri Ines Tunde Marta Hugo Noor Emil Paloma Rashid".split()


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---- math: the answer is the last number ------------------------------------------------------------------
TRAIN_ITEMS = "apples pencils notebooks mangoes candles stamps marbles tickets".split()
GOLDEN_ITEMS = "lemons batteries postcards buttons seedlings erasers".split()


def math_rows(names: list[str], items: list[str], templates: list, count: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < count:
        name, item = rng.choice(names), rng.choice(items)
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 12)
        text, answer = rng.choice(templates)(name, item, a, b, c)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"{prefix}{len(rows) + 1:05d}", "prompt": text, "reference": str(answer)})
    return rows


MATH_TRAIN = [
    lambda n, i, a, b, c: (f"{n} has {a} {i} and buys {b} more. How many {i} does {n} have now?", a + b),
    lambda n, i, a, b, c: (f"{n} packs {a} boxes with {c} {i} in each. How many {i} are packed in all?", a * c),
    lambda n, i, a, b, c: (f"{n} had {a + b} {i} and gave {b} to a friend. How many {i} are left?", a),
    lambda n, i, a, b, c: (f"{a * c} {i} are shared equally among {c} children by {n}. How many does each child get?", a),
    lambda n, i, a, b, c: (f"{n} sells {i} at {c} dollars each and sells {a} of them. How many dollars does {n} earn?", a * c),
]
MATH_GOLDEN = [
    lambda n, i, a, b, c: (f"On Monday {n} counted {a} {i}; on Tuesday {b} more arrived and {c} were used. "
                           f"What is the count on Tuesday evening?", a + b - c),
    lambda n, i, a, b, c: (f"A crate holds {c} {i}. {n} fills {a} crates and then adds {b} loose {i}. "
                           f"What is the total number of {i}?", a * c + b),
    lambda n, i, a, b, c: (f"Each of {c} shelves in {n}'s shop displays {a} {i}, and {b} more wait in storage. "
                           f"How many {i} does the shop have?", c * a + b),
]


# ---- tickets: {"category", "priority"} -----------------------------------------------------------------------
CATEGORIES = {
    "billing": (["I was charged twice for my {thing} subscription", "my invoice for the {thing} plan shows the wrong amount"],
                ["the {thing} renewal took money from my card although I cancelled"]),
    "shipping": (["my {thing} order has not arrived yet", "the tracking page for my {thing} has not changed in days"],
                 ["the courier left my {thing} parcel at the wrong address"]),
    "account": (["I cannot log in to my account since the {thing} update", "I want to change the email on my account"],
                ["my password reset link for the {thing} portal expired before I could use it"]),
    "technical": (["the {thing} app crashes when I open settings", "the {thing} sync fails with error 503"],
                  ["the {thing} dashboard shows a blank page in every browser"]),
}
TRAIN_THINGS = "premium cloud family music photo".split()
GOLDEN_THINGS = "garden fitness recipe".split()
URGENCY = {"urgent": (["This is blocking my whole team today.", "Please fix this immediately."],
                      ["We lose customers every hour this goes on."]),
           "normal": (["Could you look into it?", "Thanks in advance."],
                      ["I would appreciate an answer this week."])}


def ticket_rows(names: list[str], things: list[str], golden: bool, count: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    side = 1 if golden else 0
    rows, seen = [], set()
    while len(rows) < count:
        category = rng.choice(sorted(CATEGORIES))
        priority = rng.choice(sorted(URGENCY))
        issue = rng.choice(CATEGORIES[category][side]).format(thing=rng.choice(things))
        text = f"Hi, {rng.choice(names)} here: {issue}. {rng.choice(URGENCY[priority][side])}"
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"{prefix}{len(rows) + 1:05d}", "prompt": text,
                     "reference": json.dumps({"category": category, "priority": priority})})
    return rows


# ---- reviews: positive / negative / neutral --------------------------------------------------------------------
REVIEW_WORDS = {
    "positive": (["works perfectly", "exceeded my expectations", "is worth every penny"],
                 ["made my mornings so much easier", "is the best purchase I made this year"]),
    "negative": (["broke after two days", "is a waste of money", "stopped charging within a week"],
                 ["arrived scratched and the seller never replied", "is far worse than the photos suggest"]),
    "neutral": (["does what it says, nothing more", "is fine for the price"],
                ["is average: some things good, some not", "is as expected, neither great nor bad"]),
}
TRAIN_PRODUCTS = "kettle speaker backpack lamp blender keyboard".split()
GOLDEN_PRODUCTS = "tent scooter thermos".split()


def review_rows(products: list[str], golden: bool, count: int, seed: int, prefix: str) -> list[dict]:
    rng = random.Random(seed)
    side = 1 if golden else 0
    rows, seen = [], set()
    while len(rows) < count:
        label = rng.choice(sorted(REVIEW_WORDS))
        text = f"The {rng.choice(products)} {rng.choice(REVIEW_WORDS[label][side])}."
        if rng.random() < 0.5:
            text += f" Bought it {rng.choice(['last month', 'as a gift', 'on sale', 'for travel'])}."
        if text in seen:
            continue
        seen.add(text)
        rows.append({"id": f"{prefix}{len(rows) + 1:05d}", "text": text, "label": label})
    return rows


# The recipe's `prompts.system`, and the golden prompts' system message: the same instruction for both.
REVIEW_SYSTEM = "Classify the sentiment of the review as positive, negative or neutral. Answer with the label only."

# ---- explain: topics the grid (data/seeds/grid/topics.txt) does not hold -------------------------------------
EXPLAIN_GOLDEN = ["how vaccines train the immune system", "why the sky is blue", "how a hash table works",
                  "what inflation is", "how tides form", "what a derivative measures", "how GPS finds a position",
                  "why leaves change colour in autumn", "what a recursive function is", "how a bill becomes law"]


# Each task's instruction: the recipe's `prompts.system` (kept in the records, so the student trains with it)
# and the system message of the golden prompts (so every model is asked the same way at eval).
MATH_SYSTEM = "Solve the problem. Show the working in a few short lines, then end with a line 'Answer: <number>'."
TICKET_SYSTEM = ('Triage the customer\'s message. Answer with JSON only: {"category": billing | shipping | account | '
                 'technical, "priority": urgent | normal}.')


EXPLAIN_SYSTEM = "You are a patient, accurate teacher. Adapt your answer to the reader."


# ---- capitals: a short answer the base model knows, in a format it does not keep ----------------------------
# Capitals that are unambiguous and spelt in ASCII (no contested or multiple capitals, no accents).
CAPITALS = """France Paris|Germany Berlin|Italy Rome|Spain Madrid|Portugal Lisbon|Greece Athens|Egypt Cairo|Japan Tokyo
China Beijing|Russia Moscow|the United Kingdom London|Ireland Dublin|Sweden Stockholm|Finland Helsinki
Denmark Copenhagen|Poland Warsaw|Austria Vienna|Hungary Budapest|the Czech Republic Prague|Belgium Brussels
the Netherlands Amsterdam|Switzerland Bern|Canada Ottawa|Mexico Mexico City|Argentina Buenos Aires|Chile Santiago
Venezuela Caracas|Cuba Havana|Australia Canberra|New Zealand Wellington|India New Delhi|Pakistan Islamabad
Bangladesh Dhaka|Thailand Bangkok|Vietnam Hanoi|Indonesia Jakarta|the Philippines Manila|South Korea Seoul
North Korea Pyongyang|Iran Tehran|Iraq Baghdad|Saudi Arabia Riyadh|Turkey Ankara|Syria Damascus|Lebanon Beirut
Jordan Amman|Afghanistan Kabul|Ethiopia Addis Ababa|Nigeria Abuja|Ghana Accra|Morocco Rabat|Algeria Algiers
Tunisia Tunis|Libya Tripoli|Sudan Khartoum|Uganda Kampala|Zimbabwe Harare|Zambia Lusaka|Senegal Dakar|Mali Bamako
Angola Luanda|Belarus Minsk|Romania Bucharest|Bulgaria Sofia|Serbia Belgrade|Croatia Zagreb|Slovakia Bratislava
Slovenia Ljubljana|Lithuania Vilnius|Latvia Riga|Estonia Tallinn|Malaysia Kuala Lumpur|Nepal Kathmandu
Mongolia Ulaanbaatar|Kazakhstan Astana|Uzbekistan Tashkent|Georgia Tbilisi|Armenia Yerevan|Azerbaijan Baku
Qatar Doha|Oman Muscat|the United Arab Emirates Abu Dhabi|Jamaica Kingston|Ecuador Quito|Uruguay Montevideo
Honduras Tegucigalpa|Nicaragua Managua|the Dominican Republic Santo Domingo|Haiti Port-au-Prince|Malta Valletta
Cyprus Nicosia|Albania Tirana|North Macedonia Skopje|Bosnia and Herzegovina Sarajevo|Montenegro Podgorica
Cambodia Phnom Penh|Laos Vientiane|Madagascar Antananarivo|Rwanda Kigali|Somalia Mogadishu|Botswana Gaborone
Namibia Windhoek|Mozambique Maputo"""
CAPITALS_MULTIWORD = {"Mexico City", "Buenos Aires", "New Delhi", "Addis Ababa", "Kuala Lumpur", "Abu Dhabi",
                      "Santo Domingo", "Phnom Penh"}
CAPITAL_QUESTIONS = ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}.",
                     "What city serves as the capital of {}?"]
# The teacher's context (benchmarks/on_policy.py): an instruction and three worked examples of countries in neither set.
CAPITAL_EXAMPLES = [("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo")]


def capital_rows(seed: int) -> tuple[list[dict], list[dict]]:
    pairs = []
    for entry in CAPITALS.replace("\n", "|").split("|"):
        words = entry.split()
        # the country is every word before the city; cities of more than one word are listed above
        for size in (3, 2, 1):
            city = " ".join(words[-size:])
            if size < len(words) and (size == 1 or city in CAPITALS_MULTIWORD):
                pairs.append((" ".join(words[:-size]), city))
                break
    rng = random.Random(seed)
    rng.shuffle(pairs)
    rows = [{"id": f"c{number:03d}", "prompt": rng.choice(CAPITAL_QUESTIONS).format(country), "reference": city}
            for number, (country, city) in enumerate(pairs, 1)]
    return rows[:45], rows[45:]



def asked(system: str, text: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def main(out: Path = HERE) -> None:
    write(out / "math" / "prompts.jsonl", math_rows(TRAIN_NAMES, TRAIN_ITEMS, MATH_TRAIN, 1000, 1, "m"))
    golden = math_rows(GOLDEN_NAMES, GOLDEN_ITEMS, MATH_GOLDEN, 100, 2, "mg")
    write(out / "math" / "golden.jsonl",
          [row | {"prompt": asked(MATH_SYSTEM, row["prompt"]), "metric": "number", "tags": ["math"]} for row in golden])

    write(out / "tickets" / "prompts.jsonl", ticket_rows(TRAIN_NAMES, TRAIN_THINGS, False, 800, 3, "t"))
    golden = ticket_rows(GOLDEN_NAMES, GOLDEN_THINGS, True, 80, 4, "tg")
    write(out / "tickets" / "golden.jsonl",
          [row | {"prompt": asked(TICKET_SYSTEM, row["prompt"]), "metric": "json_match", "tags": ["tickets"]}
           for row in golden])

    write(out / "reviews" / "train.jsonl", review_rows(TRAIN_PRODUCTS, False, 200, 5, "r"))
    golden = review_rows(GOLDEN_PRODUCTS, True, 60, 6, "rg")
    write(out / "reviews" / "golden.jsonl",
          [{"id": row["id"], "prompt": asked(REVIEW_SYSTEM, row["text"]),
            "reference": row["label"],
            "metric": "normalized", "tags": ["reviews", row["label"]]} for row in golden])

    write(out / "explain" / "golden.jsonl",
          [{"id": f"eg{number:03d}", "prompt": asked(EXPLAIN_SYSTEM, f"Explain {topic} to a curious teenager, at a beginner level."),
            "metric": "judge", "tags": ["explain"]} for number, topic in enumerate(EXPLAIN_GOLDEN, 1)])

    train, golden = capital_rows(7)
    write(out / "capitals" / "prompts.jsonl", train)
    write(out / "capitals" / "golden.jsonl", [row | {"metric": "normalized", "tags": ["capitals"]} for row in golden])


if __name__ == "__main__":
    main()
