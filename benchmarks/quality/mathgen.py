"""Arithmetic and algebra word problems with exact integer answers, generated from a seed.

Every problem is one document of the form

    Problem: <question>
    Answer: <integer>

`problems(n, seed)` gives n distinct problems (distinct question texts), the same for the same (n, seed).
`split_problem(doc)` turns a document back into (prompt, answer) for the exact-match metric: the prompt ends
with "Answer:" and the answer is the text after it, without its leading space.
"""
from __future__ import annotations

import math
import random

ANSWER_TAG = "\nAnswer:"

_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Vera", "Wen", "Yusuf", "Zoe")
_ITEMS = ("apple", "book", "pencil", "marble", "sticker", "card", "orange", "cookie", "stamp", "shell", "coin",
          "ticket", "flower", "egg", "ribbon")
_VEHICLES = ("car", "train", "bus", "cyclist", "boat", "truck")


def _arith(r):
    op = r.choice("+-*/")
    if op == "+":
        a, b = r.randint(0, 999), r.randint(0, 999)
        return f"What is {a} + {b}?", a + b
    if op == "-":
        a, b = r.randint(0, 999), r.randint(0, 999)
        return f"What is {a} - {b}?", a - b
    if op == "*":
        a, b = r.randint(2, 99), r.randint(2, 30)
        return f"What is {a} * {b}?", a * b
    b, q = r.randint(2, 20), r.randint(2, 60)
    return f"What is {b * q} / {b}?", q


def _expression(r):
    a, b, c = r.randint(1, 50), r.randint(1, 50), r.randint(2, 12)
    form = r.randrange(4)
    if form == 0:
        return f"Calculate ({a} + {b}) * {c}.", (a + b) * c
    if form == 1:
        return f"Calculate {a} * {c} - {b}.", a * c - b
    if form == 2:
        return f"Calculate {a} + {b} * {c}.", a + b * c
    return f"Calculate ({a} - {b}) * {c}.", (a - b) * c


def _linear(r):
    x, a, b = r.randint(-20, 20), r.randint(2, 12), r.randint(-50, 50)
    var = r.choice("xyzn")
    sign = "+" if b >= 0 else "-"
    return f"Solve for {var}: {a}{var} {sign} {abs(b)} = {a * x + b}.", x


def _two_sided(r):
    x, a, c = r.randint(-15, 15), r.randint(3, 12), r.randint(1, 2)
    b = r.randint(1, 40)
    d = (a - c) * x - b
    sign = "+" if d >= 0 else "-"
    return f"Solve for y: {a}y - {b} = {c}y {sign} {abs(d)}.", x


def _system(r):
    x, y = r.randint(-20, 30), r.randint(-20, 30)
    ask = r.choice("xy")
    return f"If x + y = {x + y} and x - y = {x - y}, what is {ask}?", x if ask == "x" else y


def _change(r):
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    n, price = r.randint(2, 12), r.randint(1, 9)
    bill = next(v for v in (10, 20, 50, 100, 200) if v >= n * price)
    return (f"{name} buys {n} {item}s at {price} dollars each and pays with a {bill}-dollar bill. "
            f"How many dollars of change does {name} get?", bill - n * price)


def _share(r):
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    k, q = r.randint(2, 9), r.randint(2, 25)
    return (f"{name} has {k * q} {item}s and shares them equally among {k} friends. "
            f"How many {item}s does each friend get?", q)


def _buy_more(r):
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    have, bags, per = r.randint(0, 60), r.randint(2, 9), r.randint(2, 15)
    return (f"{name} has {have} {item}s and buys {bags} bags with {per} {item}s in each bag. "
            f"How many {item}s does {name} have now?", have + bags * per)


def _give_away(r):
    a, b = r.sample(_NAMES, 2)
    item = r.choice(_ITEMS)
    have = r.randint(20, 200)
    give = r.randint(1, have)
    return f"{a} had {have} {item}s and gave {give} of them to {b}. How many {item}s does {a} have left?", have - give


def _distance(r):
    v, speed, hours = r.choice(_VEHICLES), r.randint(5, 120), r.randint(2, 9)
    return f"A {v} travels at {speed} kilometres per hour for {hours} hours. How many kilometres does it travel?", \
        speed * hours


def _age(r):
    a, b = r.sample(_NAMES, 2)
    age, k, years = r.randint(2, 15), r.randint(2, 5), r.randint(1, 20)
    return f"{a} is {age} years old. {b} is {k} times as old as {a}. How old will {b} be in {years} years?", \
        age * k + years


def _percent(r):
    p = r.choice((5, 10, 20, 25, 40, 50, 60, 75))
    unit = 100 // math.gcd(p, 100)
    n = unit * r.randint(1, 40)
    return f"What is {p}% of {n}?", p * n // 100


def _remainder(r):
    a, b = r.randint(10, 999), r.randint(2, 19)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def _sequence(r):
    a, d = r.randint(-20, 50), r.choice([v for v in range(-9, 13) if v])
    return f"What is the next number in the sequence {a}, {a + d}, {a + 2 * d}, {a + 3 * d}?", a + 4 * d


def _area(r):
    w, h = r.randint(2, 40), r.randint(2, 40)
    if r.random() < 0.5:
        return f"A rectangle is {w} metres wide and {h} metres long. What is its area in square metres?", w * h
    return f"A rectangle is {w} metres wide and {h} metres long. What is its perimeter in metres?", 2 * (w + h)


def _square(r):
    a = r.randint(2, 40)
    return f"What is {a} squared?", a * a


KINDS = {"arithmetic": _arith, "expression": _expression, "linear": _linear, "two_sided": _two_sided,
         "system": _system, "change": _change, "share": _share, "buy_more": _buy_more, "give_away": _give_away,
         "distance": _distance, "age": _age, "percent": _percent, "remainder": _remainder,
         "sequence": _sequence, "area": _area, "square": _square}


def problem(question: str, answer: int) -> str:
    """The document text of one problem."""
    return f"Problem: {question}{ANSWER_TAG} {answer}"


def problems(n: int, seed: int = 0) -> list[str]:
    """n distinct problem documents (kinds drawn uniformly), deterministic in (n, seed)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, not {n!r}")
    r = random.Random(f"mathgen:{seed}")
    kinds = list(KINDS.values())
    seen, out = set(), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot make {n} distinct problems (the generators ran out of variety)")
        question, answer = r.choice(kinds)(r)
        if question in seen:
            continue
        seen.add(question)
        out.append(problem(question, answer))
    return out


def split_problem(doc: str) -> tuple[str, str]:
    """(prompt ending in "Answer:", answer text) of a problem document; ValueError if it is not one."""
    head, sep, answer = doc.rpartition(ANSWER_TAG)
    if not sep or not head.startswith("Problem: ") or not answer.strip():
        raise ValueError(f"not a problem document: {doc[:80]!r}")
    return head + ANSWER_TAG, answer.strip()
