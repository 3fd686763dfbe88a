"""Tests for data/tasks.py: the verifiable task suite and its gold judge (seed 2.2, 3.2)."""

import json
import random

import pytest

from data.tasks import (
    FAMILIES,
    Task,
    UnsafeExpression,
    generate_tasks,
    heldout_prompts,
    judge,
    judge_prompt,
    parse_task,
    pretraining_texts,
    read_jsonl,
    safe_eval,
    sft_conversations,
    split_of,
    write_jsonl,
)


@pytest.fixture(scope="module")
def train():
    return generate_tasks(600, "train", seed=0)


@pytest.fixture(scope="module")
def test():
    return generate_tasks(300, "test", seed=0)


def test_generation_is_deterministic():
    assert generate_tasks(50, "train", seed=3) == generate_tasks(50, "train", seed=3)
    assert generate_tasks(50, "train", seed=3) != generate_tasks(50, "train", seed=4)
    assert heldout_prompts(40, seed=1) == heldout_prompts(40, seed=1)
    assert sft_conversations(20, seed=2) == sft_conversations(20, seed=2)
    assert pretraining_texts(5, seed=2) == pretraining_texts(5, seed=2)


def test_every_family_and_level_is_generated(train):
    seen = {(t.family, t.level) for t in train}
    assert seen == {(f, lvl) for f in FAMILIES for lvl in (1, 2, 3)}
    only = generate_tasks(30, "train", families=["sort"], levels=[3])
    assert {(t.family, t.level) for t in only} == {("sort", 3)}
    with pytest.raises(ValueError):
        generate_tasks(1, families=["nope"])


def test_train_and_test_are_disjoint(train, test):
    assert not {t.prompt for t in train} & {t.prompt for t in test}
    assert all(split_of(FAMILIES[t.family].key(FAMILIES[t.family].parse(t.prompt))) == "train" for t in train)
    assert all(split_of(FAMILIES[t.family].key(FAMILIES[t.family].parse(t.prompt))) == "test" for t in test)
    assert len({t.prompt for t in test}) == len(test)  # the test split has no repeated question


def test_no_test_prompt_hides_inside_a_train_prompt(train, test):
    # Prompts are self-delimiting, so substring decontamination cannot mistake a longer train
    # question ("Sort 3 1 4 5 in ...") for a held-out one ("Sort 3 1 4 in ...").
    blob = "\n".join(t.prompt for t in train)
    assert not [t.prompt for t in test if t.prompt in blob]


def test_paraphrases_share_a_split():
    # The split hashes the problem, not the wording: both phrasings land on the same side,
    # and the same sum posed as an arith or an expr task does too.
    a = parse_task("What is 47 + 385?")
    fam = FAMILIES["arith"]
    assert fam.key(fam.parse("What is 47 + 385?")) == fam.key(fam.parse("Compute 47 + 385."))
    assert fam.key(fam.parse(a.prompt)) == FAMILIES["expr"].key({"expr": "47 + 385"})


def test_gold_answers_score_one_and_perturbations_less(train):
    for task in train:
        assert judge(task, task.answer) == 1.0
        assert judge(task, "  \n" + task.answer + "\n ") == 1.0
        perturbed = task.answer[:-1] + ("7" if task.answer[-1] != "7" else "3")
        if perturbed.isalpha():
            perturbed = perturbed.lower() if perturbed.isupper() else perturbed.upper()
        for wrong in (perturbed, task.answer + task.answer[-1], task.answer[1:] or "x"):
            if wrong.strip() != task.answer:
                assert judge(task, wrong) <= 0.5


def test_known_examples():
    t = parse_task("What is 47 + 385?")
    assert (t.family, t.answer, t.level) == ("arith", "432", 3)
    assert parse_task("Sort 3 10 7 in descending order.").answer == "10 7 3"
    assert parse_task("Order 3 10 7 from smallest to largest.").answer == "3 7 10"
    assert parse_task("Reverse the letters of kdoap.").answer == "paodk"
    assert parse_task("Write kdoap backwards.").answer == "paodk"
    assert parse_task("Evaluate the Python expression (3 + 4) * 2.").answer == "14"
    assert parse_task("What does 3 + 4 * 2 evaluate to in Python?").answer == "11"
    assert parse_task("How many times does the letter a appear in banana?").answer == "3"
    assert parse_task("Count how often n occurs in banana.").answer == "2"
    assert parse_task("Convert blue cat to uppercase.").answer == "BLUE CAT"
    assert parse_task("Write blue cat in capital letters.").answer == "BLUE CAT"
    with pytest.raises(ValueError):
        parse_task("Tell me a joke.")


def test_numeric_partial_credit_is_monotone():
    t = parse_task("What is 47 + 385?")
    scores = [judge(t, r) for r in ("432", "431", "440", "500", "900", "-5000", "banana")]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert scores[-1] == 0.0
    assert judge(t, "431") == judge(t, "433")  # symmetric in the error
    assert 0.4 < judge(t, "431") <= 0.5


def test_string_and_list_partial_credit_is_monotone():
    t = parse_task("Reverse the letters of kdoapqz.")  # gold "zqpaodk"
    scores = [judge(t, r) for r in ("zqpaodk", "zqpaodx", "zqpaoxx", "zqxxxxx", "xxxxxxx")]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    s = parse_task("Sort 5 1 4 2 3 in ascending order.")
    scores = [judge(s, r) for r in ("1 2 3 4 5", "1 2 3 4 9", "1 2 3 9 9", "1 9 9 9 9", "9 9 9 9 9")]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_extra_text_lowers_the_score(train):
    for task in train[:100]:
        clean = judge(task, task.answer)
        short = judge(task, task.answer + ".")
        ramble = judge(task, task.answer + " because I checked it twice, so I am confident.")
        assert clean > short > ramble > 0.0
    t = parse_task("What is 47 + 385?")
    assert judge(t, "432") > judge(t, "432 is the answer") > judge(t, "432 is the answer, " * 5)


def test_judge_prompt_agrees_with_judge(train, test):
    rng = random.Random(0)
    for task in train[:150] + test[:150]:
        assert parse_task(task.prompt) == task
        for response in (task.answer, task.answer + " ok", task.answer[::-1], str(rng.randint(0, 999)), ""):
            assert judge_prompt(task.prompt, response) == judge(task, response)
    assert judge_prompt("  What is 2 + 2?\n", "4") == 1.0  # surrounding whitespace of the prompt


def test_scores_stay_in_unit_interval_for_garbage(train):
    rng = random.Random(1)
    alphabet = "abcXYZ0123456789 -+.,\n\t!?()*" + "é漢\x00"
    for i in range(400):
        task = train[i % len(train)]
        garbage = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        if i % 50 == 0:
            garbage = "9" * 5000  # a huge "number" must not crash int parsing
        s = judge(task, garbage)
        assert 0.0 <= s <= 1.0
        if garbage.strip() != task.answer:
            assert s <= 0.5
    assert judge(train[0], "") == 0.0 and judge(train[0], "   \n") == 0.0
    with pytest.raises(TypeError):
        judge(train[0], None)


def test_safe_eval():
    assert safe_eval("(3 + 4) * 2") == 14
    assert safe_eval("-3 + 4 * 2 - 10 // 3 % 2") == 4
    for bad in ("__import__('os').system('true')", "x + 1", "abs(-3)", "(1).real", "2 ** 1000",
                "1.5 + 2", "'a' * 3", "[1][0]", "True + 1", "1 // 0", "lambda: 1", "1; 2", "9" * 300):
        with pytest.raises(UnsafeExpression):
            safe_eval(bad)


def test_sft_records_format(tmp_path):
    records = sft_conversations(200, seed=0, system_fraction=0.3, multi_turn_fraction=0.3)
    n_system = n_multi = 0
    for rec in records:
        assert list(rec) == ["messages"]
        msgs = rec["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in msgs)
        if msgs[0]["role"] == "system":
            n_system += 1
            msgs = msgs[1:]
        assert [m["role"] for m in msgs] in (["user", "assistant"], ["user", "assistant"] * 2)
        n_multi += len(msgs) == 4
        for user, assistant in zip(msgs[::2], msgs[1::2]):
            task = parse_task(user["content"])
            assert judge(task, assistant["content"]) == 1.0
            assert split_of(FAMILIES[task.family].key(FAMILIES[task.family].parse(task.prompt))) == "train"
    assert 30 < n_system < 90 and 30 < n_multi < 90

    path = tmp_path / "sub" / "sft.jsonl"
    write_jsonl(str(path), records)
    assert read_jsonl(str(path)) == records
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    assert [p.name for p in path.parent.iterdir()] == ["sft.jsonl"]  # no temp file left behind


def test_pretraining_texts_avoid_heldout_prompts():
    texts = pretraining_texts(100, seed=0)
    assert all(isinstance(t, str) and t.strip() for t in texts)
    heldout = heldout_prompts(300, seed=0)
    assert len(set(heldout)) == len(heldout)
    blob = "\n".join(texts)
    assert not [p for p in heldout if p in blob]
    assert any(p.prompt in blob for p in generate_tasks(2000, "train", seed=0))


def test_every_family_is_documented():
    for family in FAMILIES.values():
        doc = type(family).__doc__
        assert doc and "Level" in doc and "cored" in doc, family.name
