"""Preference formats, validation errors, exact tokenization (same rendering as SFT) and the bundled math pairs."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from yulan_tune.data.math_problems import extract_answer, generate_problems
from yulan_tune.data.preferences import (
    REJECTION_KINDS,
    PreferenceExample,
    UnpairedExample,
    cut_at_first_difference,
    load_preference_examples,
    math_preference_pairs,
    parse_preference_record,
    tokenize_preferences,
    unpair,
    wrong_solution,
)
from yulan_tune.data.records import DataFormatError, Record

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "2+2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}


def _parse(row: dict) -> PreferenceExample | UnpairedExample:
    return parse_preference_record(Record("pairs.jsonl", 7, row))


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "prompt_chosen_rejected"),
        ({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}, "prompt_chosen_rejected"),
        ({"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}, "implicit_prompt"),
        # a redundant prompt column next to full conversations (common in public sets) is not used twice
        ({"prompt": "2+2?", "chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}, "implicit_prompt"),
        ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"}],
          "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}, "sharegpt"),
        ({"conversations": json.dumps([{"from": "human", "value": "2+2?"}]), "chosen": "4", "rejected": "5"},
         "sharegpt"),  # CSV-style JSON text
    ],
)
def test_pair_formats_normalize_to_prompt_and_one_reply(row: dict, fmt: str) -> None:
    example = _parse(row)
    expected_prompt = [USER] if row.get("prompt") == "2+2?" and fmt == "prompt_chosen_rejected" else [SYSTEM, USER]
    if fmt == "sharegpt" and isinstance(row["conversations"], str):
        expected_prompt = [USER]
    assert isinstance(example, PreferenceExample) and example.format == fmt
    assert (example.prompt, example.chosen, example.rejected) == (expected_prompt, [GOOD], [BAD])


def test_multi_turn_shared_prefix_is_found() -> None:
    history = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    example = _parse({"chosen": history + [{"role": "assistant", "content": "6"}],
                      "rejected": history + [{"role": "assistant", "content": "7"}]})
    assert example.prompt == history and example.chosen[0]["content"] == "6" and example.rejected[0]["content"] == "7"


def test_unpaired_rows_for_kto() -> None:
    example = _parse({"prompt": "2+2?", "completion": "5", "label": "false"})
    assert isinstance(example, UnpairedExample)
    assert (example.prompt, example.completion, example.label) == ([USER], [BAD], False)
    pairs = unpair([_parse({"prompt": "2+2?", "chosen": "4", "rejected": "5"})])
    assert [(u.completion, u.label) for u in pairs] == [([GOOD], True), ([BAD], False)]


@pytest.mark.parametrize(
    ("row", "expected", "reason"),
    [
        ({"prompt": "2+2?", "chosen": "4", "rejected": "4"},
         "field 'rejected': expected different responses, got the same text for chosen and rejected",
         "identical_pair"),
        ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]},
         "field 'chosen': expected different responses, got identical conversations", "identical_pair"),
        ({"prompt": "2+2?", "chosen": "  ", "rejected": "5"},
         "field 'chosen': expected a non-empty response, got an empty string", "empty_response"),
        ({"prompt": "", "chosen": "4", "rejected": "5"},
         "field 'prompt': expected a prompt with a non-empty user turn, got ['user']", "no_prompt"),
        ({"chosen": "4", "rejected": "5"},
         "field 'prompt': missing: without it, 'chosen' and 'rejected' must be full conversations (lists of turns)",
         "no_prompt"),
        ({"chosen": [USER, GOOD, {"role": "user", "content": "ok"}, GOOD],
          "rejected": [USER, BAD, {"role": "user", "content": "ok"}, GOOD]},
         "field 'chosen[1]': expected chosen and rejected to differ only in their final assistant turn, but they "
         "diverge at turn 1 (assistant) and chosen has 3 turns after the shared prefix", "diverges_early"),
        ({"prompt": [USER], "chosen": [{"role": "bot", "content": "4"}], "rejected": "5"},
         "field 'chosen[0].role': expected one of system/user/assistant/tool, got 'bot'", "unknown_role"),
        ({"prompt": "2+2?", "completion": "4", "label": "maybe"},
         "field 'label': expected a boolean (true = desirable completion), got 'maybe'", "missing_field"),
        ({"prompt": "2+2?", "chosen": "4"},
         "field 'rejected': missing (preference rows need 'chosen' and 'rejected', plus 'prompt' or 'conversations' "
         "unless both are full conversations)", "missing_field"),
    ],
)
def test_invalid_pairs_say_where_and_what(row: dict, expected: str, reason: str) -> None:
    with pytest.raises(DataFormatError) as error:
        _parse(row)
    assert str(error.value) == f"pairs.jsonl:7: {expected}"
    assert error.value.reason == reason


def test_skip_mode_counts_bad_pairs(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x", "rejected": "x"},
            {"prompt": "b", "chosen": "", "rejected": "y"}, {"prompt": "c", "chosen": "x", "rejected": "z"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n", encoding="utf-8")
    examples, report = load_preference_examples(path, on_bad_rows="skip")
    assert [e.line for e in examples] == [1, 4]
    assert report.counts == {"identical_pair": 1, "empty_response": 1, "invalid_json": 1}


def test_tokenized_pairs_match_the_sft_rendering(tiny_tokenizer) -> None:
    from yulan_tune.data.chat import generation_prompt_ids, tokenize_conversation

    example = _parse({"prompt": [SYSTEM, USER], "chosen": "It is 4.", "rejected": "It is 5."})
    tokenized = tokenize_preferences([example], tiny_tokenizer, max_length=None)
    prompt, chosen = tokenized.columns["prompt_ids"][0], tokenized.columns["chosen_ids"][0]
    assert prompt == generation_prompt_ids(tiny_tokenizer, [SYSTEM, USER])
    full = tokenize_conversation(tiny_tokenizer, [SYSTEM, USER, {"role": "assistant", "content": "It is 4."}])
    assert prompt + chosen == full.input_ids
    # the response is exactly the trained assistant span of SFT: its text and the end-of-turn token
    assert [t for t, label in zip(full.input_ids, full.labels) if label != -100] == chosen
    assert tiny_tokenizer.decode(chosen) == "It is 4.<|eot_id|>"
    assert tiny_tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_overlong_pairs_are_counted_dropped_or_truncated(tiny_tokenizer) -> None:
    short = _parse({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    long = _parse({"prompt": "2+2?", "chosen": "four " * 40 + "end", "rejected": "four " * 40 + "fin"})
    prompt_length = len(tokenize_preferences([short], tiny_tokenizer, max_length=None).columns["prompt_ids"][0])
    limit = prompt_length + 10
    dropped = tokenize_preferences([short, long], tiny_tokenizer, max_length=limit, overlong="drop")
    assert dropped.kept == [short] and dropped.report.counts == {"too_long_dropped": 1}
    # cut to the limit, the two long replies are identical ("four four ..."): no preference left, dropped and counted
    cut = tokenize_preferences([short, long], tiny_tokenizer, max_length=limit, overlong="truncate")
    assert cut.kept == [short] and cut.report.counts == {"identical_after_truncation": 1}
    differ_early = _parse({"prompt": "2+2?", "chosen": "yes " * 40, "rejected": "no " * 40})
    cut = tokenize_preferences([differ_early], tiny_tokenizer, max_length=limit, overlong="truncate")
    assert cut.report.counts == {"too_long_truncated": 1}
    assert len(cut.columns["prompt_ids"][0]) + len(cut.columns["chosen_ids"][0]) == limit


def test_rejected_is_cut_after_its_first_difference() -> None:
    chosen = [[5, 6, 7, 8, 2], [5, 6, 2], [9, 2], [5, 6, 7, 2]]
    rejected = [[5, 6, 4, 8, 2], [5, 6, 7, 7, 2], [3, 2], [5, 6, 2]]
    cut = [cut_at_first_difference(c, r) for c, r in zip(chosen, rejected)]
    # cut after the first differing token, which may be the first token; a rejected that ends where it first differs
    # (here with its end-of-turn token) is already only its mistake
    assert cut == [[5, 6, 4], [5, 6, 7], [3], [5, 6, 2]]
    assert sum(len(a) < len(b) for a, b in zip(cut, rejected)) == 3


def test_cut_bundled_pairs_end_at_the_mistake(tiny_tokenizer) -> None:
    pairs = math_preference_pairs(40)
    data = tokenize_preferences(pairs, tiny_tokenizer, max_length=None, rejected_span="first_difference")
    whole = tokenize_preferences(pairs, tiny_tokenizer, max_length=None)
    assert data.columns["chosen_ids"] == whole.columns["chosen_ids"]
    cut = sum(len(a) < len(b) for a, b in zip(data.columns["rejected_ids"], whole.columns["rejected_ids"]))
    assert data.report.counts == {"rejected_cut_at_first_difference": cut} and cut > 0
    assert data.report.total_skipped == 0
    for pair, chosen, rejected in zip(pairs, data.columns["chosen_ids"], data.columns["rejected_ids"]):
        # what is left of the rejected answer is a prefix of its text that the chosen answer does not start with
        text = tiny_tokenizer.decode(rejected)
        assert pair.rejected[0]["content"].startswith(text) and not pair.chosen[0]["content"].startswith(text)
        assert rejected[:-1] == chosen[: len(rejected) - 1] and rejected[-1] != chosen[len(rejected) - 1]


def test_bundled_pairs_are_correct_vs_plausibly_wrong() -> None:
    train, test = math_preference_pairs(300, seed=0), math_preference_pairs(60, seed=0, split="test")
    problems = {p.question: p for p in generate_problems(300, 0)}
    assert {e.kind for e in train} == set(REJECTION_KINDS)
    for pair in train:
        problem = problems[pair.prompt[0]["content"].split("\n")[0]]
        chosen, rejected = pair.chosen[0]["content"], pair.rejected[0]["content"]
        assert chosen == problem.solution and extract_answer(chosen) == problem.answer
        assert extract_answer(rejected) != problem.answer and rejected.endswith(f"The answer is "
                                                                                f"{extract_answer(rejected)}.")
    assert not {e.prompt[0]["content"] for e in train} & {e.prompt[0]["content"] for e in test}  # held out


def test_each_kind_of_wrong_answer() -> None:
    problem = next(p for p in generate_problems(50, 0) if p.operation == "add_sub")  # "a + b = s. s - c = n."
    a, b, s, _, c, _, _ = (int(x) for x in re.findall(r"-?\d+", problem.solution))
    rng = random.Random(0)
    off = wrong_solution(problem, "off_by_one", rng)
    assert off.startswith(f"{a} + {b} = {s}. {s} - {c} = ") and abs(extract_answer(off) - problem.answer) == 1
    assert wrong_solution(problem, "wrong_operation", rng) == f"{a} + {b} = {s}. {s} + {c} = {s + c}. " \
                                                              f"The answer is {s + c}."
    final = wrong_solution(problem, "wrong_final_number", rng)
    assert final.startswith(problem.solution[: problem.solution.rfind("The answer")])
    assert extract_answer(final) in {a, b, c, s} - {problem.answer}


def test_misread_operand_is_worked_out_consistently_from_the_wrong_number() -> None:
    rng = random.Random(0)
    problems = generate_problems(200, 0)
    step = re.compile(r"(-?\d+) ([-+*]) (-?\d+) = (-?\d+)\.")  # not imported: an independent check
    for problem in problems:
        wrong = wrong_solution(problem, "misread_operand", rng)
        steps, truth = step.findall(wrong), step.findall(problem.solution)
        assert len(steps) == len(truth)
        assert 1 <= abs(int(steps[0][0]) - int(truth[0][0])) <= 2  # only the copied first number is wrong ...
        assert [s[1:3] for s in steps] == [t[1:3] for t in truth]
        for a, op, b, result in steps:  # ... and every step follows from it
            assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        if len(steps) == 2:
            assert steps[1][0] == steps[0][3]  # the second step continues from the (wrong) first result
        assert extract_answer(wrong) == int(steps[-1][3]) != problem.answer


def test_column_mapping_reads_chosen_and_rejected_messages(tmp_path: Path) -> None:
    row = {"chosen_messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
           "rejected_messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataFormatError, match="field 'chosen': missing"):
        load_preference_examples(path)
    (pair,), report = load_preference_examples(path, columns={"chosen": "chosen_messages",
                                                               "rejected": "rejected_messages"})
    assert not report and pair.prompt == [{"role": "user", "content": "2+2?"}]
    assert pair.chosen == [{"role": "assistant", "content": "4"}] and pair.rejected[0]["content"] == "5"


def test_no_train_set_the_recipes_can_ask_for_holds_a_test_question() -> None:
    """The question space is small: without the train pool left out, the quickstart's 10000 SFT problems held 103
    of the first 1000 test questions."""
    from yulan_tune.data.math_problems import TRAIN_POOL, generate_problems

    test = {p.question for p in generate_problems(1500, 0, split="test")}
    assert not test & {p.question for p in generate_problems(TRAIN_POOL, 0, split="train")}
    with pytest.raises(ValueError, match=f"at most {TRAIN_POOL} train problems"):
        generate_problems(TRAIN_POOL + 1, 0, split="train")
