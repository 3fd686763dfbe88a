"""Verifiable tasks and their programmatic judge: the default offline data for every alignment stage.

Where this sits in the seed chapter
-----------------------------------
* Part 2.2 (instruction-tuning datasets): `sft_conversations` turns tasks into FLAN-style
  "explicit instruction → output" demonstrations, in the ecosystem's SFT JSONL format
  `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`, some with a system
  message and some multi-turn (two tasks in one chat).
* Part 3.2 (collect comparison data): InstructGPT asks human labelers to rank k sampled
  responses. We have no labelers, so `judge` plays the labeler: it returns the *gold* score of
  any response, and ranking k responses by it gives the (prompt, y_w, y_l) comparisons that the
  reward model r_φ is trained on (3.3). The same gold score later measures whether PPO (3.4) and
  DPO (Part 4) really improved the policy π_θ, or only the proxy r_φ (reward hacking, 3.5).

Because every task has a checkable answer, the whole pipeline runs offline on a laptop: no
human data, no API, and an honest held-out evaluation.

Task families and difficulty levels (level 1 / 2 / 3)
-----------------------------------------------------
    arith    a ± b                     operands of up to 1 / 2 / 3 digits (level 3 may go negative)
    sort     sort a list of integers    3 numbers 0-9 / 4 numbers 0-99 / 5-6 numbers 0-99
    reverse  reverse a letter string    3-4 / 5-6 / 7-8 random lowercase letters
    expr     a Python int expression    2 operands / 3 operands (precedence) / 3-4 with parentheses
    count    occurrences of a letter    in a 4-6 / 7-9 / 10-13 letter string
    upper    uppercase some words       1 / 2 / 3-4 common English words

`generate_tasks` mixes levels with `LEVEL_WEIGHTS` (35% / 40% / 25%). The mix is meant so that a
~1-5M-parameter model learns level 1 and part of level 2 with SFT while level 3 stays hard,
leaving headroom for PPO and DPO to show a gain on the gold score (tune the weights, not the
families, if a run saturates or learns nothing).

Train / test split
------------------
Each instance has a canonical *problem key* that does not depend on the wording of the prompt
("47+385" for both "What is 47 + 385?" and "Compute 47 + 385."; the same key for the identical
expr-family problem). A stable SHA-256 hash of that key puts `TEST_FRACTION` of all problems in
the test split. So train and test are disjoint by prompt, and also by problem: no paraphrase of a
test question is ever trained on. (Python's built-in `hash()` is salted per process; never used.)
Every prompt wording is self-delimiting (fixed words at both ends), so no prompt is a substring
of another and decontaminating pretraining text by substring search against
`heldout_prompts()` removes exactly the held-out questions.

Scoring rule (`judge`)
----------------------
Let r be the response with surrounding whitespace stripped and g the gold answer.

    r == g                                   → 1.0
    r empty                                  → 0.0
    otherwise                                → 0.5 · content · exp(−extra / EXTRA_CHARS_SCALE)

* head  = the first w whitespace-separated words of r (w = number of words in g), with trailing
          punctuation such as "." removed; the answer is expected to come first.
* extra = number of characters of r beyond the head (rambling after the answer).
* content ∈ [0, 1] compares head with g, and is 1 only when they agree:
      numbers (arith, expr, count): 1 / (1 + |h − g| / max(1, |g| / 10)), 0 if head is not an
                                    integer — strictly decreasing in the distance |h − g|;
      lists (sort):                 1 − Levenshtein(head items, gold items) / len(gold items);
      strings (reverse, upper):     max(0, 1 − Levenshtein(head, g) / len(g)).

So any non-exact response earns at most 0.5, a near miss earns more than a far miss (a smooth
signal for RL), garbage earns (nearly) 0, and the right answer followed by extra text earns
less than the clean answer — the gold judge never rewards verbosity. A reward model that learns
a length bias can then be caught "hacking" it.
"""

from __future__ import annotations

import abc
import argparse
import ast
import hashlib
import json
import math
import os
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

# ----------------------------------------------------------------------------------------------
# Knobs
# ----------------------------------------------------------------------------------------------

TEST_FRACTION = 0.2  # share of all problems (by hashed key) reserved for the test split
LEVEL_WEIGHTS = {1: 0.35, 2: 0.40, 3: 0.25}  # default difficulty mix
EXTRA_CHARS_SCALE = 20.0  # extra characters that shrink a non-exact score by a factor e
NON_EXACT_CAP = 0.5  # the most a response that is not exactly the answer can earn

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant. Reply with the answer only.",
    "Answer briefly and exactly.",
)


@dataclass(frozen=True)
class Task:
    """One verifiable problem: `prompt` is the user instruction, `answer` the gold response."""

    family: str
    prompt: str
    answer: str
    level: int = 1


# ----------------------------------------------------------------------------------------------
# A safe evaluator for small integer expressions (never `eval`)
# ----------------------------------------------------------------------------------------------


class UnsafeExpression(ValueError):
    """The text is not a plain integer arithmetic expression."""


_BIN_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_UNARY_OPS = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}
MAX_EXPR_CHARS = 200


def safe_eval(expr: str) -> int:
    """Evaluate an integer expression built only from literals, + - * // %, unary ±, parentheses.

    The text is parsed with `ast` and the tree is walked by hand: names, calls, attributes,
    subscripts, floats, strings, powers and everything else raise `UnsafeExpression`, so no
    user-controlled code can run and no result can explode (no `**`)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise UnsafeExpression("expression must be a string of at most %d characters" % MAX_EXPR_CHARS)
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise UnsafeExpression(f"not an expression: {expr!r}") from e

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:  # bool is not allowed
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)) and right == 0:
                raise UnsafeExpression("division by zero")
            return _BIN_OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
            return _UNARY_OPS[type(node.op)](walk(node.operand))
        raise UnsafeExpression(f"{type(node).__name__} is not allowed in {expr!r}")

    return walk(tree)


# ----------------------------------------------------------------------------------------------
# Similarity helpers used by the judge
# ----------------------------------------------------------------------------------------------


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _edit_similarity(head: Sequence, gold: Sequence) -> float:
    """max(0, 1 − edit distance / len(gold)); 1 only for equal sequences."""
    if not gold:
        return float(not head)
    if len(head) >= 2 * len(gold):  # the distance is then ≥ len(gold): skip the DP
        return 0.0
    return max(0.0, 1.0 - levenshtein(head, gold) / len(gold))


_INT_RE = re.compile(r"[+-]?\d{1,18}")  # longer digit strings are garbage, not answers


def _number_closeness(head: str, gold: str) -> float:
    """1 / (1 + |h − g| / scale), scale = max(1, |g| / 10); 0 if head is not an integer."""
    if not _INT_RE.fullmatch(head):
        return 0.0
    h, g = int(head), int(gold)
    return 1.0 / (1.0 + abs(h - g) / max(1.0, abs(g) / 10.0))


# ----------------------------------------------------------------------------------------------
# Task families. Each knows how to sample an instance at a level, render it as a prompt (several
# wordings), parse a prompt back, solve it, and compare a response's head with the gold answer.
# ----------------------------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Family(abc.ABC):
    """Base class: `sample` → instance dict, `render`/`parse` ↔ prompt, `solve` → gold answer."""

    name = ""
    kind = "string"  # "number" | "list" | "string": how `content` compares head and gold

    @abc.abstractmethod
    def sample(self, rng: random.Random, level: int) -> dict:
        ...

    @abc.abstractmethod
    def key(self, inst: dict) -> str:
        """Canonical problem key, independent of wording; hashed to pick the split."""
        ...

    @abc.abstractmethod
    def templates(self) -> list[tuple[str, re.Pattern]]:
        """(format string, full-match regex) pairs: the wordings of this family's prompts.

        Every wording starts with fixed words and ends with fixed words or punctuation, so a
        prompt is never a substring of a different prompt ("Sort 3 1 4 in ..." cannot hide inside
        "Sort 3 1 4 5 in ..."): decontamination by substring search is then exact."""
        ...

    def fields(self, inst: dict) -> dict:
        return inst

    def from_fields(self, fields: dict) -> dict:
        return fields

    @abc.abstractmethod
    def solve(self, inst: dict) -> str:
        ...

    @abc.abstractmethod
    def level_of(self, inst: dict) -> int:
        ...

    def render(self, inst: dict, rng: random.Random) -> str:
        fmt, _ = rng.choice(self.templates())
        return fmt.format(**self.fields(inst))

    def parse(self, prompt: str) -> dict | None:
        for _, pattern in self.templates():
            m = pattern.fullmatch(prompt)
            if m:
                return self.from_fields(m.groupdict())
        return None

    def content(self, head: str, gold: str) -> float:
        if self.kind == "number":
            return _number_closeness(head, gold)
        if self.kind == "list":
            items = [t.strip(",;") for t in head.split()]
            return _edit_similarity([t for t in items if t], gold.split())
        return _edit_similarity(" ".join(head.split()), gold)


def _digits_number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0-9 for one digit)."""
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


class Arith(Family):
    """Multi-digit addition and subtraction: "What is 47 + 385?" → "432".

    Tests carrying and borrowing. Level L: the larger operand has exactly L digits, the other
    1..L digits; at level 3 subtraction may have a negative result. Scored as a number: exact = 1,
    otherwise 0.5 · closeness, so 431 beats 400 beats 0."""

    name, kind = "arith", "number"
    _num = r"(?P<a>\d+) (?P<op>[+-]) (?P<b>\d+)"

    def templates(self):
        return [
            ("What is {a} {op} {b}?", re.compile(rf"What is {self._num}\?")),
            ("Compute {a} {op} {b}.", re.compile(rf"Compute {self._num}\.")),
            ("Work out {a} {op} {b}.", re.compile(rf"Work out {self._num}\.")),
        ]

    def sample(self, rng, level):
        big = _digits_number(rng, level)
        small = _digits_number(rng, rng.randint(1, level))
        a, b = max(big, small), min(big, small)
        op = rng.choice("+-")
        if op == "+" or (level == 3 and rng.random() < 0.5):
            if rng.random() < 0.5:
                a, b = b, a
        return {"a": a, "op": op, "b": b}

    def from_fields(self, f):
        return {"a": int(f["a"]), "op": f["op"], "b": int(f["b"])}

    def key(self, inst):
        return f"{inst['a']}{inst['op']}{inst['b']}"  # shared with Expr on purpose

    def solve(self, inst):
        return str(inst["a"] + inst["b"] if inst["op"] == "+" else inst["a"] - inst["b"])

    def level_of(self, inst):
        return min(3, len(str(max(inst["a"], inst["b"]))))


class Sort(Family):
    """Sort a short list of integers: "Sort 42 7 19 in ascending order." → "7 19 42".

    Tests comparison and copying of several items; ascending or descending. Level 1: 3 numbers
    in 0-9, level 2: 4 numbers in 0-99, level 3: 5-6 numbers in 0-99 (repeats allowed). Scored
    by list edit distance: each misplaced, missing or extra item costs 1/len of the partial credit."""

    name, kind = "sort", "list"
    _nums = r"(?P<nums>\d+(?: \d+)*)"
    _words = {"smallest to largest": "ascending", "largest to smallest": "descending"}

    def templates(self):
        return [
            ("Sort {nums} in {order} order.",
             re.compile(rf"Sort {self._nums} in (?P<order>ascending|descending) order\.")),
            ("Order {nums} from {words}.",
             re.compile(rf"Order {self._nums} from (?P<words>smallest to largest|largest to smallest)\.")),
        ]

    def sample(self, rng, level):
        length = {1: 3, 2: 4, 3: rng.randint(5, 6)}[level]
        top = 9 if level == 1 else 99
        return {"nums": [rng.randint(0, top) for _ in range(length)],
                "order": rng.choice(["ascending", "descending"])}

    def fields(self, inst):
        words = next(w for w, o in self._words.items() if o == inst["order"])
        return {"nums": " ".join(map(str, inst["nums"])), "order": inst["order"], "words": words}

    def from_fields(self, f):
        order = f.get("order") or self._words[f["words"]]
        return {"nums": [int(x) for x in f["nums"].split()], "order": order}

    def key(self, inst):
        return f"sort:{inst['order']}:{','.join(map(str, inst['nums']))}"

    def solve(self, inst):
        return " ".join(map(str, sorted(inst["nums"], reverse=inst["order"] == "descending")))

    def level_of(self, inst):
        n = len(inst["nums"])
        return 1 if n <= 3 else 2 if n == 4 else 3


class Reverse(Family):
    """Reverse a string of random letters: "Reverse the letters of kdoap." → "paodk".

    Tests character-level manipulation through a byte-level BPE tokenizer (the model must know
    how its tokens are spelled). Level 1: 3-4 letters, level 2: 5-6, level 3: 7-8. Scored by
    character edit distance to the reversed string."""

    name, kind = "reverse", "string"
    _lengths = {1: (3, 4), 2: (5, 6), 3: (7, 8)}

    def templates(self):
        return [
            ("Reverse the letters of {word}.", re.compile(r"Reverse the letters of (?P<word>[a-z]+)\.")),
            ("Write {word} backwards.", re.compile(r"Write (?P<word>[a-z]+) backwards\.")),
        ]

    def sample(self, rng, level):
        return {"word": "".join(rng.choice(LETTERS) for _ in range(rng.randint(*self._lengths[level])))}

    def key(self, inst):
        return f"reverse:{inst['word']}"

    def solve(self, inst):
        return inst["word"][::-1]

    def level_of(self, inst):
        n = len(inst["word"])
        return 1 if n <= 4 else 2 if n <= 6 else 3


class Expr(Family):
    """Evaluate a small Python integer expression: "Evaluate the Python expression (3 + 4) * 2." → "14".

    Tests operator precedence and parentheses; digits 1-9, operators + - *. Level 1: two
    operands, level 2: three operands (precedence matters), level 3: three or four operands with
    a parenthesised pair. The gold answer comes from `safe_eval`, never `eval`. Scored as a number."""

    name, kind = "expr", "number"
    _expr = r"(?P<expr>[0-9+\-*() ]+)"

    def templates(self):
        return [
            ("Evaluate the Python expression {expr}.",
             re.compile(rf"Evaluate the Python expression {self._expr}\.")),
            ("What does {expr} evaluate to in Python?",
             re.compile(rf"What does {self._expr} evaluate to in Python\?")),
        ]

    def sample(self, rng, level):
        n = {1: 2, 2: 3, 3: rng.randint(3, 4)}[level]
        nums = [str(rng.randint(1, 9)) for _ in range(n)]
        ops = [rng.choice("+-*") for _ in range(n - 1)]
        if level == 3:  # wrap operands i, i+1 in parentheses
            i = rng.randrange(n - 1)
            nums[i], nums[i + 1] = "(" + nums[i], nums[i + 1] + ")"
        parts = [nums[0]]
        for op, num in zip(ops, nums[1:]):
            parts += [op, num]
        return {"expr": " ".join(parts)}

    def from_fields(self, f):
        return {"expr": f["expr"]}

    def key(self, inst):
        return inst["expr"].replace(" ", "")

    def solve(self, inst):
        return str(safe_eval(inst["expr"]))

    def level_of(self, inst):
        if "(" in inst["expr"]:
            return 3
        return 2 if len(re.findall(r"\d+", inst["expr"])) >= 3 else 1


class Count(Family):
    """Count occurrences of a letter: "How many times does the letter e appear in qeexbe?" → "3".

    Tests character-level attention and counting. The string is random letters with the target
    letter planted at ~25% of positions. Level 1: 4-6 letters, level 2: 7-9, level 3: 10-13.
    Scored as a number (off by one at count 3 earns half the partial credit)."""

    name, kind = "count", "number"
    _lengths = {1: (4, 6), 2: (7, 9), 3: (10, 13)}

    def templates(self):
        return [
            ("How many times does the letter {letter} appear in {word}?",
             re.compile(r"How many times does the letter (?P<letter>[a-z]) appear in (?P<word>[a-z]+)\?")),
            ("Count how often {letter} occurs in {word}.",
             re.compile(r"Count how often (?P<letter>[a-z]) occurs in (?P<word>[a-z]+)\.")),
        ]

    def sample(self, rng, level):
        letter = rng.choice(LETTERS)
        others = LETTERS.replace(letter, "")
        n = rng.randint(*self._lengths[level])
        word = "".join(letter if rng.random() < 0.25 else rng.choice(others) for _ in range(n))
        return {"letter": letter, "word": word}

    def key(self, inst):
        return f"count:{inst['letter']}:{inst['word']}"

    def solve(self, inst):
        return str(inst["word"].count(inst["letter"]))

    def level_of(self, inst):
        n = len(inst["word"])
        return 1 if n <= 6 else 2 if n <= 9 else 3


WORDS = (
    "apple bird blue book bread car cat city cloud cold dark day desk dog door dream east "
    "fast fire fish flower food forest friend game garden glass gold green happy hat heavy hill "
    "home horse house ice island king lake lamp light lion long map milk moon mountain music "
    "night north ocean orange paper park pen piano quick quiet rain red river road rock rose "
    "salt sand school sea ship silver sky small snow song star stone storm street summer sun "
    "table tall tea tiger train tree warm water west white wind window winter wolf wood word "
    "world yellow young"
).split()


class Upper(Family):
    """Uppercase a few common words: "Convert blue cat to uppercase." → "BLUE CAT".

    Tests a token-to-token mapping (lower- and upper-case spellings are different BPE tokens);
    the easiest family, it anchors the SFT format. Level 1: one word, level 2: two, level 3:
    three or four. Scored by character edit distance."""

    name, kind = "upper", "string"

    def templates(self):
        return [
            ("Convert {text} to uppercase.", re.compile(r"Convert (?P<text>[a-z]+(?: [a-z]+)*) to uppercase\.")),
            ("Write {text} in capital letters.",
             re.compile(r"Write (?P<text>[a-z]+(?: [a-z]+)*) in capital letters\.")),
        ]

    def sample(self, rng, level):
        n = {1: 1, 2: 2, 3: rng.randint(3, 4)}[level]
        return {"text": " ".join(rng.choice(WORDS) for _ in range(n))}

    def key(self, inst):
        return f"upper:{inst['text']}"

    def solve(self, inst):
        return inst["text"].upper()

    def level_of(self, inst):
        return min(3, len(inst["text"].split()))


FAMILIES: dict[str, Family] = {f.name: f for f in (Arith(), Sort(), Reverse(), Expr(), Count(), Upper())}


# ----------------------------------------------------------------------------------------------
# Generation and splitting
# ----------------------------------------------------------------------------------------------


def split_of(key: str) -> str:
    """"test" for a stable TEST_FRACTION of problem keys (SHA-256, same on every machine)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < TEST_FRACTION else "train"


def _weights(spec, default: Mapping, what: str) -> tuple[list, list[float]]:
    """Accept None (default), an iterable of names (uniform) or a {name: weight} mapping."""
    if spec is None:
        spec = default
    if not isinstance(spec, Mapping):
        spec = {k: 1.0 for k in spec}
    for k in spec:
        if k not in default:
            raise ValueError(f"unknown {what} {k!r}; choose from {sorted(default)}")
    items = [(k, float(w)) for k, w in spec.items() if w > 0]
    if not items:
        raise ValueError(f"no {what} with positive weight")
    return [k for k, _ in items], [w for _, w in items]


def _make_task(family: Family, inst: dict, rng: random.Random) -> Task:
    return Task(family.name, family.render(inst, rng), family.solve(inst), family.level_of(inst))


def _sample_tasks(rng: random.Random, n: int, split: str, families=None, levels=None,
                  unique: bool = False) -> list[Task]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    fam_names, fam_w = _weights(families, {k: 1.0 for k in FAMILIES}, "family")
    lvl_names, lvl_w = _weights(levels, LEVEL_WEIGHTS, "level")
    tasks, seen = [], set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(tasks) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"could not draw {n} distinct {split} tasks from {fam_names} at levels "
                             f"{lvl_names}: the problem space is too small")
        family = FAMILIES[rng.choices(fam_names, fam_w)[0]]
        inst = family.sample(rng, rng.choices(lvl_names, lvl_w)[0])
        if split_of(family.key(inst)) != split:
            continue
        task = _make_task(family, inst, rng)
        if unique:
            if task.prompt in seen:
                continue
            seen.add(task.prompt)
        tasks.append(task)
    return tasks


def generate_tasks(n: int, split: str = "train", seed: int = 0, families=None, levels=None,
                   unique: bool | None = None) -> list[Task]:
    """`n` tasks from one split, deterministic given `seed`.

    families: None (all, uniform), a list of names, or {name: weight}.
    levels:   None (`LEVEL_WEIGHTS`), a list of levels, or {level: weight}.
    unique:   no repeated prompt; defaults to True for "test" (an evaluation set counts each
              question once) and False for "train"."""
    rng = random.Random(f"tasks/{split}/{seed}")  # str seeds are hashed deterministically
    return _sample_tasks(rng, n, split, families, levels, unique=(split == "test") if unique is None else unique)


def heldout_prompts(n: int = 500, seed: int = 0, families=None, levels=None) -> list[str]:
    """Distinct test-split prompts: for evaluation, and for decontaminating pretraining data."""
    return [t.prompt for t in generate_tasks(n, "test", seed, families, levels)]


# ----------------------------------------------------------------------------------------------
# The judge (seed 3.2: the programmatic stand-in for a human labeler)
# ----------------------------------------------------------------------------------------------


def _split_head(response: str, n_words: int) -> tuple[str, int]:
    """(head, extra): the first `n_words` words of the stripped response without trailing
    punctuation, and the number of characters that follow them."""
    words = list(re.finditer(r"\S+", response))
    if not words:
        return "", 0
    end = words[min(n_words, len(words)) - 1].end()
    head = response[:end].rstrip(".,;:!?")
    return head, len(response) - len(head)


def judge(task: Task, response: str) -> float:
    """Gold score of `response` for `task`, in [0, 1] (the rule is in the module docstring).

    1.0 for exactly the answer (surrounding whitespace ignored); otherwise
    0.5 · content(head, answer) · exp(−extra_chars / EXTRA_CHARS_SCALE); 0.0 when empty."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    text = response.strip()
    if text == task.answer:
        return 1.0
    if not text:
        return 0.0
    head, extra = _split_head(text, len(task.answer.split()))
    content = FAMILIES[task.family].content(head, task.answer)
    return NON_EXACT_CAP * content * math.exp(-extra / EXTRA_CHARS_SCALE)


def parse_task(prompt: str) -> Task:
    """Recover the Task from its prompt text (any family, any wording); ValueError if unknown."""
    text = prompt.strip()
    for family in FAMILIES.values():
        inst = family.parse(text)
        if inst is not None:
            try:
                return Task(family.name, text, family.solve(inst), family.level_of(inst))
            except UnsafeExpression as e:
                raise ValueError(f"not a valid task prompt: {prompt!r} ({e})") from e
    raise ValueError(f"not a task prompt: {prompt!r}")


def judge_prompt(prompt: str, response: str) -> float:
    """`judge` for a (prompt, response) pair, e.g. a row of preference data, without the Task."""
    return judge(parse_task(prompt), response)


# ----------------------------------------------------------------------------------------------
# Data for the stages: SFT conversations (2.2), pretraining text, JSONL files
# ----------------------------------------------------------------------------------------------


def sft_conversations(n: int, seed: int = 0, system_fraction: float = 0.2, multi_turn_fraction: float = 0.2,
                      families=None, levels=None) -> list[dict]:
    """`n` SFT records `{"messages": [...]}` from the train split (seed 2.2-2.3).

    A `system_fraction` of them open with a short system message; a `multi_turn_fraction` hold
    two tasks (user, assistant, user, assistant). The assistant turns are the bare gold answers."""
    rng = random.Random(f"sft/{seed}")
    records = []
    for _ in range(n):
        turns = 2 if rng.random() < multi_turn_fraction else 1
        messages = []
        if rng.random() < system_fraction:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for task in _sample_tasks(rng, turns, "train", families, levels):
            messages.append({"role": "user", "content": task.prompt})
            messages.append({"role": "assistant", "content": task.answer})
        records.append({"messages": messages})
    return records


_QA_FORMATS = (
    ("Q: {p}\nA: {a}", "Practice questions"),
    ("Question: {p}\nAnswer: {a}", "Exercises with answers"),
    ("{p}\n{a}", "Worked examples"),
)


def pretraining_texts(n: int, seed: int = 0, families=None, levels=None) -> list[str]:
    """`n` short plain-text worksheets (a title and 3-8 question/answer pairs) from the train
    split, for a small share of the pretraining mixture. Test-split problems never appear."""
    rng = random.Random(f"pretrain/{seed}")
    texts = []
    for _ in range(n):
        fmt, title = rng.choice(_QA_FORMATS)
        tasks = _sample_tasks(rng, rng.randint(3, 8), "train", families, levels)
        body = "\n\n".join(fmt.format(p=t.prompt, a=t.answer) for t in tasks)
        texts.append(f"{title}\n\n{body}\n")
    return texts


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically (temp file in the same folder + rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_jsonl(path: str) -> list[dict]:
    """Read a JSONL file written by `write_jsonl` (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------
# Command line: write the default task data into a run directory and show a few examples
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the built-in verifiable task data (SFT, held-out, pretraining).")
    p.add_argument("--out", default="runs/demo/data", help="folder for sft.jsonl, heldout.jsonl, pretrain_tasks.jsonl")
    p.add_argument("--sft", type=int, default=5000, help="number of SFT conversations")
    p.add_argument("--heldout", type=int, default=500, help="number of distinct test-split tasks")
    p.add_argument("--pretrain", type=int, default=2000, help="number of pretraining worksheets")
    p.add_argument("--seed", type=int, default=0, help="random seed (output is deterministic given it)")
    p.add_argument("--show", type=int, default=6, help="print this many example tasks with judged responses")
    args = p.parse_args(argv)

    write_jsonl(os.path.join(args.out, "sft.jsonl"), sft_conversations(args.sft, args.seed))
    write_jsonl(os.path.join(args.out, "heldout.jsonl"),
                (asdict(t) for t in generate_tasks(args.heldout, "test", args.seed)))
    write_jsonl(os.path.join(args.out, "pretrain_tasks.jsonl"),
                ({"text": t} for t in pretraining_texts(args.pretrain, args.seed)))
    print(f"wrote {args.sft} SFT conversations, {args.heldout} held-out tasks, "
          f"{args.pretrain} pretraining worksheets to {args.out}")
    for task in generate_tasks(args.show, "train", args.seed):
        if FAMILIES[task.family].kind == "number":
            wrong = str(int(task.answer) + 1)
        else:
            wrong = task.answer[:-1] + ("x" if task.answer[-1] != "x" else "y")
        print(f"[{task.family} L{task.level}] {task.prompt!r} → {task.answer!r}   "
              f"judge: gold 1.00, near miss {judge(task, wrong):.2f}, "
              f"gold+ramble {judge(task, task.answer + ' is my final answer.'):.2f}")


if __name__ == "__main__":
    main()
