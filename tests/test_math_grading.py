"""
Tests for the MATH benchmarks: the LaTeX grader (math-verify behind data.is_correct(..., "math"))
on a table of equivalent and non-equivalent answers in the forms MATH-500's gold answers take;
MATH-schema tables (MATH-500's columns, and MATH's own: type, "Level 3", the answer boxed in the
solution) read as tasks, their errors; the hub tasks math / math500 and their training split;
per-subject and per-level accuracy, maj@k and pairs graded by kind.
"""

import json

import pytest

import data
import eval as evaluate

# (gold answer as MATH-500 writes it, a completion, equal?): the forms MATH's answers take
GRADED = [
    # coordinates, and the order inside them
    (r"\left( 3, \frac{\pi}{2} \right)", r"The point is $\boxed{(3, \frac{\pi}{2})}$.", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"$\boxed{(3,\pi)}$", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"$\boxed{\left(\frac{\pi}{2}, 3\right)}$", False),
    # fractions: \dfrac, a/b, mixed numbers, decimals (exact only)
    (r"\frac{14}{3}", r"\boxed{\dfrac{14}{3}}", True),
    (r"\frac{14}{3}", r"\boxed{14/3}", True),
    (r"\frac{14}{3}", r"\boxed{4\frac{2}{3}}", True),
    (r"\frac{14}{3}", r"\boxed{4.67}", False),
    (r"\frac{14}{3}", r"\boxed{\frac{3}{14}}", False),
    (r"\frac{1}{2}", r"\boxed{0.5}", True),
    (r"\frac{1}{2}", r"\boxed{\dfrac12}", True),
    (r"-\frac{1}{3}", r"so $x = \boxed{-\frac13}$", True),
    (r"\frac{3}{56}", r"so $p(8) = \boxed{\frac{3}{56}}$", True),
    # symbolic expressions, complex numbers, radicals
    (r"p - q", r"\boxed{-q + p}", True),
    (r"p - q", r"\boxed{q - p}", False),
    (r"6 - 5i", r"\boxed{6-5i}", True),
    (r"6 - 5i", r"\boxed{6+5i}", False),
    (r"3\sqrt{13}", r"\boxed{\sqrt{117}}", True),
    (r"3\sqrt{13}", r"\boxed{\sqrt{13}}", False),
    (r"11\sqrt2", r"\boxed{11\sqrt{2}}", True),
    (r"x^2+2x+1", r"\boxed{(x+1)^2}", True),
    # intervals and unions
    (r"(2,12) \cup (12,102)", r"\boxed{(2, 12)\cup(12, 102)}", True),
    (r"(2,12) \cup (12,102)", r"\boxed{(2,102)}", False),
    (r"(-\infty, 3]", r"\boxed{(-\infty,3]}", True),
    (r"(-\infty, 3]", r"\boxed{(-\infty,3)}", False),
    # several answers: a set, in any order
    (r"1,-2", r"\boxed{-2, 1}", True),
    (r"1,-2", r"\boxed{1}", False),
    # degrees, units, dollars, percent, bases
    (r"90^\circ", r"\boxed{90}", True),
    (r"90^\circ", r"\boxed{90^{\circ}}", True),
    (r"90^\circ", r"\boxed{\frac{\pi}{2}}", False),
    (r"42", r"\boxed{42 \text{ inches}}", True),
    (r"\$18.90", r"\boxed{\$18.9}", True),
    (r"10\%", r"\boxed{10\%}", True),
    (r"4210_{5}", r"\boxed{4210_5}", True),
    # text answers and multiple-choice letters
    (r"\text{Evelyn}", r"\boxed{\text{Evelyn}}", True),
    (r"\text{Evelyn}", r"\boxed{\text{Angela}}", False),
    (r"\text{(C)}", r"\boxed{\text{(C)}}", True),
    (r"\text{(C)}", r"\boxed{\text{(D)}}", False),
    # integers; signs
    (r"-50", r"Pairing the terms gives $\boxed{-50}$.", True),
    (r"-50", r"\boxed{50}", False),
    (r"2220", r"The answer is 2220.", True),                 # no box: the other anchors
    (r"\frac{1}{2}", r"so $\boxed{.5}$", True),              # a decimal without its 0
    (r".5", r"\boxed{\dfrac12}", True),
    (r".5", r"\boxed{5}", False),
    (r"7", r"I could not solve it.", False),
    # what is read: two boxes close together are read as a set of answers (math-verify's rule);
    # nothing after a stray "Question:" the model started
    (r"9", r"first \boxed{8}, then corrected: \boxed{9}", False),
    (r"5", "\\boxed{5}\nQuestion: what is 2+2? \\boxed{4}", True),
    (r"4", "\\boxed{5}\nQuestion: what is 2+2? \\boxed{4}", False),
]


@pytest.mark.parametrize("gold,completion,equal", GRADED)
def test_math_grader_table(gold, completion, equal):
    assert data.is_correct(completion, gold, kind="math") is equal


def test_one_grading_entry_point_for_both_benchmarks():
    assert data.is_correct("so 3/4 of 8 is 6.\n#### 6", "6", kind="gsm8k")
    assert data.is_correct(r"#### 6", "6")  # the default: GSM8K's numeric grader
    assert not data.is_correct(r"\boxed{\frac{1}{2}}", "0.5", kind="gsm8k")  # it reads the 1
    assert data.is_correct(r"\boxed{\frac{1}{2}}", "0.5", kind="math")
    assert data.extract_answer(r"so $\boxed{\dfrac12}$", "math") == r"\frac{1}{2}"
    with pytest.raises(ValueError, match="kind must be one of gsm8k, math"):
        data.is_correct("#### 6", "6", kind="MATH")


MATH500_ROWS = [  # MATH-500's columns
    dict(problem=f"What is ${k}+\\frac{{1}}{{2}}$?", solution=f"It is $\\boxed{{{k}.5}}$.",
         answer=f"{k}.5", subject=["Algebra", "Prealgebra", "Geometry"][k % 3], level=1 + k % 5,
         unique_id=f"test/x/{k}.json") for k in range(60)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_math500_schema_file_is_a_task(tmp_path):
    path = write_jsonl(tmp_path / "math500.jsonl", MATH500_ROWS)
    train, test = data.load_task(str(path), "train"), data.load_task(str(path), "test")
    assert len(train) + len(test) == 60 and test  # one file: split by a hash of the problem
    assert not {e["question"] for e in train} & {e["question"] for e in test}
    ex = test[0]
    row = next(r for r in MATH500_ROWS if r["problem"] == ex["question"])
    assert ex["answer"] == row["answer"] and ex["kind"] == "math"
    assert (ex["subject"], ex["level"]) == (row["subject"], row["level"])
    assert ex["response"] == " " + row["solution"] and data.CHAT_INSTRUCTION in ex["prompt"]
    assert ex["prompt"] == data.format_prompt(f"{row['problem']}\n{data.CHAT_INSTRUCTION}")
    assert all(data.is_correct(e["response"], e["answer"], data.grader(e)) for e in train + test)


def test_math_training_rows_without_an_answer_column(tmp_path):
    """MATH's own files: type for the subject, "Level 3", the answer boxed in the solution (the
    last box, nested braces, two boxed answers joined)."""
    rows = [dict(problem="Find x.", type="Algebra", level="Level 3",
                 solution=r"First $\boxed{2}$ is wrong... so $x = \boxed{\frac{\sqrt{3}}{2}}$."),
            dict(problem="Solve it.", type="Number Theory", level="Level ?",
                 solution=r"The roots are $\boxed{1}$ and $\boxed{-2}$.")]
    folder = tmp_path / "math"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    a, b = data.load_task(str(folder), "train")
    assert (a["answer"], a["subject"], a["level"]) == (r"\frac{\sqrt{3}}{2}", "Algebra", 3)
    assert b["answer"] == "1,-2" and "level" not in b  # "Level ?": no level
    assert data.is_correct(r"\boxed{-2, 1}", b["answer"], "math")


@pytest.mark.parametrize("row,message", [
    (dict(problem="p", solution="no box here"), r"row 0: no final answer"),
    (dict(problem="p", solution="s", answer=" "), r"row 0: no final answer"),
    (dict(problem="", solution=r"\boxed{1}"), r"row 0: field 'problem' is empty"),
    (dict(problem="p", Solution=r"\boxed{1}"), r"column 'Solution' is not 'solution'"),
])
def test_bad_math_rows_name_themselves(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ValueError, match=message):
        data.load_task(str(path), "train")


def test_hub_tasks_math500_and_math(tmp_path, monkeypatch, capsys):
    """math500: MATH's training split and MATH-500's test split; math: MATH's own two splits.
    A training problem that is also a test problem is left out of training, and said so.
    (datasets.load_dataset is replaced by local files: the hub is never reached here.)"""
    import datasets
    train_rows = [dict(problem=f"Problem {k}", solution=f"\\boxed{{{k}}}", type="Algebra",
                       level="Level 2") for k in range(10)]
    files = {("DigitalLearningGmbH/MATH-lighteval", "train"): train_rows,
             ("DigitalLearningGmbH/MATH-lighteval", "test"): train_rows[8:] + [
                 dict(problem="Problem 99", solution=r"\boxed{99}", type="Geometry",
                      level="Level 5")],
             ("HuggingFaceH4/MATH-500", "test"): [dict(MATH500_ROWS[0], problem="Problem 3")]}
    calls = []

    def load_dataset(source, config=None, split=None, **kw):
        calls.append((source, config, split))
        return datasets.Dataset.from_list(files[source, split])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    test = data.load_task("math500", "test")
    assert [e["question"] for e in test] == ["Problem 3"] and test[0]["subject"] == "Algebra"
    train = data.load_task("math500", "train")
    assert [e["question"] for e in train] == [f"Problem {k}" for k in range(10) if k != 3]
    assert "math500: 1 training problems are also test problems" in capsys.readouterr().out
    assert ("DigitalLearningGmbH/MATH-lighteval", "default", "train") in calls
    assert len(data.load_task("math", "train")) == 8 and len(data.load_task("math", "test")) == 3


def test_per_subject_and_per_level_accuracy():
    records = [dict(correct=c, prompt_cut=False, subject=s, level=lv) for c, s, lv in [
        (True, "Algebra", 1), (False, "Algebra", 2), (True, "Geometry", 2), (True, "Algebra", 1)]]
    m = evaluate.accuracy_of(records)
    assert m["by_subject"] == {"Algebra": {"accuracy": 2 / 3, "correct": 2, "n": 3},
                               "Geometry": {"accuracy": 1.0, "correct": 1, "n": 1}}
    assert m["by_level"]["2"] == {"accuracy": 0.5, "correct": 1, "n": 2}
    table = evaluate.breakdown_table({"SFT": m, "ADPO": m})
    assert "| subject | n | SFT % | ADPO % |" in table and "| Algebra | 3 | 66.7 | 66.7 |" in table
    assert "| level | n | SFT % | ADPO % |" in table
    gsm8k = evaluate.accuracy_of([dict(correct=True, prompt_cut=False)])
    assert "by_subject" not in gsm8k and evaluate.breakdown_table({"x": gsm8k}) == ""


def test_majority_vote_and_pairs_are_graded_by_kind():
    samples = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", r"\boxed{\frac{1}{2}}", "no answer"]
    assert evaluate.majority_answer(samples, "math") == (r"\frac{1}{2}", samples[0])
    assert evaluate.majority_answer(["none", "here"], "math") == (None, None)
    record = dict(prompt="p", answer="0.5", kind="math", samples=samples)
    (pair,), stats = data.pairs_from_samples([record])
    assert pair["chosen"] == samples[0] and pair["rejected"] == samples[1]
    assert stats["sample_accuracy"] == 0.5


# -----------------------------------------------------------------------------
# the whole pipeline on a local MATH-schema file


def math_file(path):
    """A small MATH-schema file: sums with their worked solutions boxed, MATH-500's columns."""
    rows = [dict(problem=f"{ask} ${a}+{b}$.", solution=f"${a}+{b}={a + b}$, so it is "
                 f"$\\boxed{{{a + b}}}$.", answer=str(a + b),
                 subject=["Prealgebra", "Algebra"][(a + b) % 2], level=1 + a % 3)
            for ask in ("Compute", "Find", "Evaluate", "Give") for a in range(6) for b in range(6)]
    return write_jsonl(path, rows)


@pytest.mark.slow
def test_pipeline_on_a_local_math_file(tmp_path, capsys):
    """SFT on the solutions, on-policy pairs graded by math-verify, ADPO, eval: every grade is
    the math grader's, and the per-subject and per-level accuracy reach eval.json, summary.json
    and the printed report."""
    import train
    from machinery.common import read_jsonl
    out = tmp_path / "run"
    summary = train.main(["--preset", "smoke", "--out_dir", str(out),
                          "--task", str(math_file(tmp_path / "math.jsonl")), "--n_train", "0",
                          "--n_test", "0", "--block_size", "192", "--max_len", "192",
                          "--max_new_tokens", "36", "--n_pair_questions", "24",
                          "--po_epochs", "1"])
    report = capsys.readouterr().out
    for stage in ("sft", "po"):
        saved = json.loads((out / stage / "eval.json").read_text())
        for r in saved["records"]:
            assert r["correct"] == data.is_correct(r["completion"], r["gold"], "math")
            assert r["subject"] in ("Prealgebra", "Algebra") and r["level"] in (1, 2, 3)
        by_subject = saved["metrics"]["by_subject"]
        assert sum(v["n"] for v in by_subject.values()) == saved["metrics"]["n"]
        assert summary[stage]["test"]["by_level"] == saved["metrics"]["by_level"]
    pairs = read_jsonl(out / "pairs" / "train.jsonl") + read_jsonl(out / "pairs" / "val.jsonl")
    assert pairs and summary["pairs"]["pairs"] == len(pairs)  # some samples were graded right
    for p in pairs:
        assert data.is_correct(p["chosen"], p["answer"], "math")
        assert not data.is_correct(p["rejected"], p["answer"], "math")
    assert "| subject | n | SFT % |" in report and "| level | n | SFT % |" in report
