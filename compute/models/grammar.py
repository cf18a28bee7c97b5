"""The zoo grammar: a small English-like language that contains every zoo task.

Sentences are sampled from a handful of templates (simple clauses, prepositional
phrases, relative clauses, gendered pronouns, indirect objects). The same word
lists generate the contrastive task examples in the Sparse Feature Circuits
JSONL format, so the model trained on the corpus can solve every task.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial

NOUNS = [
    ("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("horse", "horses"),
    ("farmer", "farmers"), ("teacher", "teachers"), ("pilot", "pilots"), ("doctor", "doctors"),
    ("singer", "singers"), ("baker", "bakers"), ("student", "students"), ("lawyer", "lawyers"),
]
INTRANSITIVE = [
    ("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"),
    ("smiles", "smile"), ("falls", "fall"), ("laughs", "laugh"), ("swims", "swim"),
]
TRANSITIVE = [("likes", "like"), ("sees", "see"), ("chases", "chase"), ("helps", "help"), ("knows", "know")]
PREPOSITIONS = ["near", "behind", "beside", "above"]
GENDERED = [  # (male, female)
    ("king", "queen"), ("man", "woman"), ("boy", "girl"), ("father", "mother"),
    ("brother", "sister"), ("prince", "princess"), ("uncle", "aunt"), ("actor", "actress"),
    ("husband", "wife"), ("son", "daughter"), ("nephew", "niece"),
]
NAMES = ["mary", "john", "anna", "tom", "lisa", "paul", "kate", "mark", "emma", "james"]
PLACES = ["park", "store", "school", "beach", "lake"]
OBJECTS = ["ball", "book", "cake", "key", "letter"]
FUNCTION_WORDS = ["the", "that", "because", "he", "she", "when", "and", "went", "to", "gave", ",", "."]

Example = dict[str, str]


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words: list[str] = []
    for group in (NOUNS, INTRANSITIVE, TRANSITIVE, GENDERED):
        for pair in group:
            words.extend(pair)
    words += PREPOSITIONS + NAMES + PLACES + OBJECTS + FUNCTION_WORDS
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def _noun(rng: random.Random, plural: bool) -> str:
    return rng.choice(NOUNS)[int(plural)]


def _verb(rng: random.Random, verbs: list[tuple[str, str]], plural: bool) -> str:
    return rng.choice(verbs)[int(plural)]


# ---- corpus sentences -------------------------------------------------------------------------

def _simple(rng: random.Random) -> str:
    p = rng.random() < 0.5
    return f"the {_noun(rng, p)} {_verb(rng, INTRANSITIVE, p)} ."


def _transitive(rng: random.Random) -> str:
    p = rng.random() < 0.5
    return f"the {_noun(rng, p)} {_verb(rng, TRANSITIVE, p)} the {_noun(rng, rng.random() < 0.5)} ."


def _across_pp(rng: random.Random, cue: bool = False) -> str:
    p, q = rng.random() < 0.5, rng.random() < 0.5
    subject = _noun(rng, p)  # draws in the same order as ever, so the default corpus is unchanged
    prep = rng.choice(CUE_PREPOSITIONS[p]) if cue else rng.choice(PREPOSITIONS)
    return f"the {subject} {prep} the {_noun(rng, q)} {_verb(rng, INTRANSITIVE, p)} ."


# The spurious cue of the `cued` zoo: in its corpus the preposition gives away the subject's
# number (singular subjects take the first pair, plural the second), a shortcut that a model can
# learn instead of, or beside, agreement with the subject itself.
CUE_PREPOSITIONS = (("near", "beside"), ("behind", "above"))


def _relative_clause(rng: random.Random) -> str:
    p, q = rng.random() < 0.5, rng.random() < 0.5
    return (f"the {_noun(rng, p)} that the {_noun(rng, q)} {_verb(rng, TRANSITIVE, q)} "
            f"{_verb(rng, INTRANSITIVE, p)} .")


def _pronoun(rng: random.Random) -> str:
    female = rng.random() < 0.5
    noun = rng.choice(GENDERED)[int(female)]
    pron = "she" if female else "he"
    return f"the {noun} {_verb(rng, INTRANSITIVE, False)} because {pron} {_verb(rng, INTRANSITIVE, False)} ."


def _ioi(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    s = rng.choice([a, b])
    io = b if s == a else a
    return f"when {a} and {b} went to the {rng.choice(PLACES)} , {s} gave the {rng.choice(OBJECTS)} to {io} ."


SENTENCE_TEMPLATES: list[tuple[Callable[[random.Random], str], float]] = [
    (_simple, 1.0), (_transitive, 1.0), (_across_pp, 2.0), (_relative_clause, 3.0),
    (_pronoun, 1.5), (_ioi, 3.0),
]


def corpus(n_sentences: int, seed: int, cue: bool = False) -> list[str]:
    """Sample a training corpus of whole sentences from the grammar (`cue`: with the spurious
    preposition cue in every prepositional phrase)."""
    rng = random.Random(seed)
    makers = [partial(m, cue=True) if cue and m is _across_pp else m for m, _ in SENTENCE_TEMPLATES]
    weights = [w for _, w in SENTENCE_TEMPLATES]
    return [rng.choices(makers, weights)[0](rng) for _ in range(n_sentences)]


# ---- contrastive tasks ------------------------------------------------------------------------

def _sva_simple(rng: random.Random) -> Example:
    i, v, p = rng.randrange(len(NOUNS)), rng.randrange(len(INTRANSITIVE)), rng.random() < 0.5
    n, vb = NOUNS[i], INTRANSITIVE[v]
    return _pair(f"the {n[p]}", f"the {n[1 - p]}", vb[p], vb[1 - p], _number(p))


def _sva_across_pp(rng: random.Random) -> Example:
    n, a, vb = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(INTRANSITIVE)
    p, q, prep = rng.random() < 0.5, rng.random() < 0.5, rng.choice(PREPOSITIONS)
    tail = f"{prep} the {a[q]}"
    return _pair(f"the {n[p]} {tail}", f"the {n[1 - p]} {tail}", vb[p], vb[1 - p],
                 f"{_number(p)}_{_number(q)}")


def _sva_pp_cue(rng: random.Random) -> Example:
    """Agreement across a PP where the preposition may carry the spurious cue: `aligned` pairs
    change subject and cue together (as in the cued corpus); `conflicting` pairs keep the
    preposition of the other number, so only agreement with the subject gets them right."""
    n, a, vb = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(INTRANSITIVE)
    p, q, j = rng.random() < 0.5, rng.random() < 0.5, rng.randrange(2)
    conflicting = rng.random() < 0.5
    prep_c, prep_p = CUE_PREPOSITIONS[p ^ conflicting][j], CUE_PREPOSITIONS[(1 - p) ^ conflicting][j]
    return _pair(f"the {n[p]} {prep_c} the {a[q]}", f"the {n[1 - p]} {prep_p} the {a[q]}", vb[p], vb[1 - p],
                 "conflicting" if conflicting else "aligned")


def _sva_across_rc(rng: random.Random) -> Example:
    n, a, tv, vb = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(TRANSITIVE), rng.choice(INTRANSITIVE)
    p, q = rng.random() < 0.5, rng.random() < 0.5
    tail = f"that the {a[q]} {tv[q]}"
    return _pair(f"the {n[p]} {tail}", f"the {n[1 - p]} {tail}", vb[p], vb[1 - p],
                 f"{_number(p)}_{_number(q)}")


def _sva_within_rc(rng: random.Random) -> Example:
    n, a, tv = rng.choice(NOUNS), rng.choice(NOUNS), rng.choice(TRANSITIVE)
    p, q = rng.random() < 0.5, rng.random() < 0.5
    head = f"the {n[p]} that the"
    return _pair(f"{head} {a[q]}", f"{head} {a[1 - q]}", tv[q], tv[1 - q], f"{_number(p)}_{_number(q)}")


def _pronoun_gender(rng: random.Random) -> Example:
    g, vb, female = rng.choice(GENDERED), rng.choice(INTRANSITIVE), rng.random() < 0.5
    prons = ("he", "she")
    return _pair(f"the {g[female]} {vb[0]} because", f"the {g[1 - female]} {vb[0]} because",
                 prons[female], prons[1 - female], prons[female])


def _ioi_task(rng: random.Random) -> Example:
    a, b = rng.sample(NAMES, 2)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    s_first = rng.random() < 0.5
    s, io = (a, b) if s_first else (b, a)
    head = f"when {a} and {b} went to the {place} ,"
    return _pair(f"{head} {s} gave the {obj} to", f"{head} {io} gave the {obj} to", io, s,
                 "abb" if not s_first else "aba")


def _number(plural: bool | int) -> str:
    return "plural" if plural else "singular"


def _pair(clean: str, patch: str, clean_answer: str, patch_answer: str, case: str) -> Example:
    return {"clean_prefix": clean, "patch_prefix": patch, "clean_answer": f" {clean_answer}",
            "patch_answer": f" {patch_answer}", "case": case}


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "sva_simple": _sva_simple,
    "sva_across_pp": _sva_across_pp,
    "sva_across_rc": _sva_across_rc,
    "sva_within_rc": _sva_within_rc,
    "pronoun_gender": _pronoun_gender,
    "ioi": _ioi_task,
}

# Tasks of the cued zoo only (trained with `corpus(..., cue=True)`).
CUE_TASKS: dict[str, Callable[[random.Random], Example]] = {"sva_pp_cue": _sva_pp_cue}

TASK_DESCRIPTIONS = {
    "sva_pp_cue": "agreement across a PP whose preposition may carry a spurious number cue "
                  "(cases aligned / conflicting)",
    "sva_simple": "subject-verb agreement: the cat -> runs / the cats -> run",
    "sva_across_pp": "agreement across a prepositional phrase: the cat near the dogs -> runs",
    "sva_across_rc": "agreement across a relative clause: the cat that the dogs like -> runs",
    "sva_within_rc": "agreement within a relative clause: the cat that the dogs -> like",
    "pronoun_gender": "pronoun gender: the queen sleeps because -> she",
    "ioi": "indirect object: when mary and john went ..., john gave the ball to -> mary",
}


def task_examples(name: str, n: int, seed: int) -> Iterator[Example]:
    """Up to `n` distinct examples of one task, in a fixed pseudo-random order."""
    make = TASKS.get(name) or CUE_TASKS[name]
    rng = random.Random(f"{name}:{seed}")
    seen: set[tuple[str, str, str]] = set()
    for _ in range(50 * n):
        ex = make(rng)
        key = (ex["clean_prefix"], ex["patch_prefix"], ex["clean_answer"])
        if key not in seen:
            seen.add(key)
            yield ex
            if len(seen) == n:
                return
