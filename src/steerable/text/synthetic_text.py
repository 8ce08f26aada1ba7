"""A synthetic text population with a known answer, for testing the NP-DPO path on a CPU in minutes.

Prompts ask about an object: ``tell me about the {adjective} {noun}``. Every prompt has four candidate
responses: a short and a long answer about the right object, and a short and a long answer about a
wrong object::

    short: the {adjective} {noun} is {q1} .
    long:  the {adjective} {noun} is {q1} , and it is also {q2} and {q3} .

Two hidden user types score a response by on-topic (+2) plus matching their taste in length (+1):

* ``concise`` prefers short answers, ``verbose`` long ones — so on short-vs-long pairs about the right
  object the types **conflict**;
* both prefer an on-topic answer to an off-topic one, whatever the lengths — on those pairs they
  **agree** (so the context-free baseline has something to learn and the two types' accuracies are not
  one minus the other).

The types' rules, used to check generated text: a response *follows* ``concise`` when it has the short
form (no ", and it is also" clause) and ``verbose`` when it has the long form; it is *well-formed* when it
matches one of the two forms exactly, about the prompt's own adjective and noun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from steerable.data.text import TextPreferences

NOUNS = [
    "cat",
    "river",
    "garden",
    "city",
    "train",
    "piano",
    "forest",
    "bridge",
    "lamp",
    "ocean",
    "castle",
    "robot",
    "apple",
    "island",
    "market",
    "clock",
    "desert",
    "violin",
    "tower",
    "school",
    "harbor",
    "meadow",
    "rocket",
    "library",
]
ADJECTIVES = ["red", "blue", "green", "old", "new", "small", "large", "quiet"]
QUALITIES = [
    "lovely",
    "useful",
    "famous",
    "strange",
    "calm",
    "bright",
    "busy",
    "simple",
    "ancient",
    "popular",
]
TYPES = ("concise", "verbose")
SHORT = re.compile(r"^the (\w+) (\w+) is (\w+) \.$")
LONG = re.compile(r"^the (\w+) (\w+) is (\w+) , and it is also (\w+) and (\w+) \.$")


def vocabulary() -> list[str]:
    """Every word the population uses (prompts and responses)."""
    return sorted(
        set(
            NOUNS
            + ADJECTIVES
            + QUALITIES
            + ["tell", "me", "about", "the", "is", ",", "and", "it", "also", "."]
        )
    )


def prompt_text(adjective: str, noun: str) -> str:
    return f"tell me about the {adjective} {noun}"


def parse_prompt(prompt: str) -> tuple[str, str]:
    words = prompt.split()
    return words[-2], words[-1]


def classify(prompt: str, response: str) -> dict[str, bool]:
    """Which form a response has and whether it is well-formed for its prompt (module docstring)."""
    text = " ".join(response.split())
    adjective, noun = parse_prompt(prompt)
    short, long = SHORT.match(text), LONG.match(text)
    form = short or long
    well_formed = bool(form) and form.group(1) == adjective and form.group(2) == noun
    follows_long = ", and it is also" in text
    return {"concise": not follows_long, "verbose": follows_long, "well_formed": well_formed}


@dataclass
class Candidates:
    """The four responses to one prompt."""

    prompt: str
    short: str
    long: str
    short_off: str
    long_off: str

    def utility(self, response: str, kind: str) -> int:
        on_topic = response in (self.short, self.long)
        is_short = response in (self.short, self.short_off)
        return 2 * on_topic + int(is_short == (kind == "concise"))


def candidates(adjective: str, noun: str, rng: np.random.Generator) -> Candidates:
    q = rng.choice(QUALITIES, size=3, replace=False)
    other = rng.choice([n for n in NOUNS if n != noun])
    short = f"the {adjective} {noun} is {q[0]} ."
    long = f"the {adjective} {noun} is {q[0]} , and it is also {q[1]} and {q[2]} ."
    return Candidates(
        prompt_text(adjective, noun),
        short,
        long,
        short.replace(f" {noun} ", f" {other} "),
        long.replace(f" {noun} ", f" {other} "),
    )


def split_prompts(test_share: float, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """All (adjective, noun) prompts split into train and held-out sets (every word appears in train)."""
    rng = np.random.default_rng(seed)
    prompts = [(a, n) for a in ADJECTIVES for n in NOUNS]
    order = rng.permutation(len(prompts))
    cut = round(len(prompts) * (1 - test_share))
    return [prompts[i] for i in order[:cut]], [prompts[i] for i in order[cut:]]


def simulate_users(
    prompts: list[tuple[str, str]],
    num_users: int,
    pairs_per_user: int,
    conflict_share: float = 0.5,
    seed: int = 0,
    first_user: int = 0,
) -> tuple[TextPreferences, np.ndarray]:
    """Users alternating between the two types, each answering ``pairs_per_user`` pairs on distinct
    prompts; ``conflict_share`` of the pairs are short-vs-long on topic, the rest on- vs off-topic.
    Returns the pairs and a per-pair flag: the types disagree on it."""
    rng = np.random.default_rng(seed)
    users, modes, p_list, chosen, rejected, conflict = [], [], [], [], [], []
    for u in range(num_users):
        kind = u % 2
        for j in rng.choice(len(prompts), size=min(pairs_per_user, len(prompts)), replace=False):
            c = candidates(*prompts[j], rng)
            if rng.random() < conflict_share:
                a, b = c.short, c.long
            else:
                a = c.short if rng.random() < 0.5 else c.long
                b = c.short_off if rng.random() < 0.5 else c.long_off
            ua, ub = c.utility(a, TYPES[kind]), c.utility(b, TYPES[kind])
            users.append(f"u{first_user + u}")
            modes.append(kind)
            p_list.append([{"role": "user", "content": c.prompt}])
            chosen.append([{"role": "assistant", "content": a if ua > ub else b}])
            rejected.append([{"role": "assistant", "content": b if ua > ub else a}])
            other = TYPES[1 - kind]
            conflict.append((c.utility(a, other) > c.utility(b, other)) != (ua > ub))
    data = TextPreferences(
        user_ids=np.array(users, dtype=object),
        prompts=p_list,
        chosen=chosen,
        rejected=rejected,
        hidden_mode=np.array(modes, dtype=np.int64),
        source="<synthetic length styles>",
    )
    return data, np.array(conflict, dtype=bool)


def sft_examples(prompts: list[tuple[str, str]], copies: int, seed: int) -> tuple[list[str], list[str]]:
    """(prompt, response) pairs for fitting the base LM: on-topic short and long answers in equal shares."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(copies):
        for a, n in prompts:
            c = candidates(a, n, rng)
            xs += [c.prompt, c.prompt]
            ys += [c.short, c.long]
    return xs, ys
