"""Write the demo task's prompts: extract a person's name and city from a sentence into JSON.

    python data/seeds/make_extraction.py      # rewrites data/seeds/extraction.jsonl and data/golden/extraction.jsonl

The golden set shares no name, city or sentence pattern with the training prompts, so no training
prompt is near a golden one (the factory's contamination check can confirm it).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

TRAIN_NAMES = """Maria Ahmed Lena Tom Yuki Carlos Priya Olga Kwame Sofia Jonas Amara Diego Mei Ivan Fatima Lucas
Aisha Noah Elif Mateo Chloe Omar Hannah Ravi Ingrid Pablo Zara Felix Nadia Kenji Lucia Samir Greta Tariq Alma
Viktor Rosa Emeka Clara""".split()
TRAIN_CITIES = """Lisbon Cairo Berlin Toronto Osaka Lima Mumbai Kyiv Accra Madrid Oslo Nairobi Hanoi Dublin Quito
Prague Dakar Perth Seville Krakow Manila Bogota Tunis Porto Helsinki Jakarta Montreal Lyon Santiago Zagreb
Havana Riga Tbilisi Denver Naples Cusco Bergen Leeds Malaga Geneva""".split()
TRAIN_TEMPLATES = [
    "{name} moved to {city} last spring to start a new job.",
    "Yesterday {name} flew from {city} to attend a conference.",
    "After years abroad, {name} finally settled in {city}.",
    "The bakery in {city} is run by a woman named {name}.",
    "{name} says the best coffee is found in {city}.",
    "Our new colleague {name} works remotely from {city}.",
    "In {city}, {name} teaches piano to children on weekends.",
    "{name} was born in {city} and still visits every summer.",
    "The marathon in {city} was won by {name} this year.",
    "A letter from {name} arrived, postmarked {city}.",
    "{name} rents a small flat near the old harbour of {city}.",
    "Tickets to {city} were cheap, so {name} booked two.",
]
GOLDEN_NAMES = """Beatriz Hassan Mirela Oskar Sakura Rafael Divya Tatiana Kofi Leonor Anders Zainab Sebastian Lin
Dmitri Layla Gabriel Selin Julian Esther""".split()
GOLDEN_CITIES = """Valencia Alexandria Hamburg Vancouver Kyoto Arequipa Chennai Lviv Kumasi Bilbao Tromso Mombasa
Hue Galway Cuenca Brno Cork Adelaide Granada Gdansk""".split()
GOLDEN_TEMPLATES = [
    "Everyone at the festival in {city} wanted a photo with {name}.",
    "{name} opened a bookshop on a quiet street in {city}.",
    "The train to {city} was late, and {name} missed the meeting.",
    "Last night {name} cooked dinner for friends visiting {city}.",
    "When the storm hit {city}, {name} stayed home and read.",
]

# What the teacher sees and the student never does: an instruction and three worked examples.
CONTEXT = [
    {"role": "system", "content": "Extract the person's name and the city from the user's text. Reply with a JSON object only."},
    {"role": "user", "content": "Peter has lived in Vienna for ten years."},
    {"role": "assistant", "content": '{"name": "Peter", "city": "Vienna"}'},
    {"role": "user", "content": "The museum in Rome hired Giulia as a guide."},
    {"role": "assistant", "content": '{"name": "Giulia", "city": "Rome"}'},
    {"role": "user", "content": "Last week Hana visited her aunt in Seoul."},
    {"role": "assistant", "content": '{"name": "Hana", "city": "Seoul"}'},
]


def _lines(names, cities, templates, count, seed, prefix, golden):
    rng = random.Random(seed)
    seen = set()
    while len(seen) < count:
        item = (rng.choice(names), rng.choice(cities), rng.choice(templates))
        if item in seen:
            continue
        seen.add(item)
        name, city, template = item
        reference = json.dumps({"name": name, "city": city})
        line = {"id": f"{prefix}{len(seen):04d}", "prompt": template.format(name=name, city=city), "reference": reference}
        if golden:
            line.update(metric="json_match", tags=["extraction"])
        yield line


def main() -> None:
    for path, args in [
        (HERE / "extraction.jsonl", (TRAIN_NAMES, TRAIN_CITIES, TRAIN_TEMPLATES, 120, 0, "x", False)),
        (HERE.parent / "golden" / "extraction.jsonl", (GOLDEN_NAMES, GOLDEN_CITIES, GOLDEN_TEMPLATES, 60, 1, "g", True)),
    ]:
        with path.open("w", encoding="utf-8") as handle:
            for line in _lines(*args):
                handle.write(json.dumps(line) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
