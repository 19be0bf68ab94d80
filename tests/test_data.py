"""
Tests for data.py: the arith task, grading, tokenization, masks, truncation, batching, file loading.
"""

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import train
from machinery import common
from machinery.tokenizer import get_tokenizer

STEP = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

def steps_of(response):
    """[(a, op, b, c)] for every step line of a worked solution."""
    return [tuple(int(g) if g not in OPS else g for g in m.groups())
            for line in response.split("\n") for m in [STEP.search(line)] if m]

def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)

def write_jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))

# -----------------------------------------------------------------------------
# the arith task

def test_arith_deterministic_and_seeded():
    a = data.load_task("arith", "train", n=200, seed=0)
    b = data.load_task("arith", "train", n=200, seed=0)
    c = data.load_task("arith", "train", n=200, seed=1)
    assert a == b
    assert [e["question"] for e in a] != [e["question"] for e in c]
    assert len(a) == 200 and set(a[0]) == {"question", "prompt", "response", "answer", "steps"}


def test_a_range_of_steps_mixes_short_and_long_problems_and_each_knows_its_length():
    examples = data.load_task("arith", "test", n=300, seed=0, steps=(1, 6), max_number=10)
    assert {e["steps"] for e in examples} == {1, 2, 3, 4, 5, 6}
    for e in examples:  # a step is a line "a+b=c" of the worked solution
        assert e["steps"] == e["response"].count("=")
    cfg = train.Config(arith_steps=1, arith_max_steps=6, n_test=300)
    assert data.load_split(cfg, "test") == examples
    fixed = data.load_split(train.Config(n_test=300), "test")
    assert {e["steps"] for e in fixed} == {2}  # the default: two steps each

def test_arith_splits_disjoint_and_distinct():
    train = {e["question"] for e in data.load_task("arith", "train", n=3000, seed=0)}
    for seed in (0, 1):
        test = [e["question"] for e in data.load_task("arith", "test", n=300, seed=seed)]
        assert len(set(test)) == len(test) == 300
        assert not train & set(test)
    assert len(train) == 3000
    assert len(data.load_task("arith", "test")) == data.ARITH_SIZES["test"]
    with pytest.raises(ValueError, match="split 'validation'"):
        data.load_task("arith", "validation")

@pytest.mark.parametrize("knobs", [{}, dict(steps=(3, 5), max_number=200, ops="+-*", max_factor=4),
                                   dict(steps=1, ops="-", max_number=9)])
def test_arith_worked_steps_are_right(knobs):
    exs = data.load_task("arith", "train", n=300, seed=3, **knobs)
    lo, hi = ((knobs.get("steps", (2, 2)),) * 2 if isinstance(knobs.get("steps"), int)
              else knobs.get("steps", (2, 2)))
    negatives = 0
    for e in exs:
        assert e["prompt"] == f"Question: {e['question']}\nAnswer:"
        assert e["response"].startswith(" ") and e["response"].endswith(f"\n#### {e['answer']}")
        st = steps_of(e["response"])
        assert lo <= len(st) <= hi
        for k, (a, op, b, c) in enumerate(st):
            assert op in knobs.get("ops", "+-") and OPS[op](a, b) == c
            assert k == 0 or a == st[k - 1][3]                  # each step continues from the last
            assert b <= (knobs.get("max_factor", 5) if op == "*" else knobs.get("max_number", 50))
            negatives += c < 0
        # starts from the question's number
        assert e["question"].split(" has ")[1].startswith(f"{st[0][0]} ")
        assert str(st[-1][3]) == e["answer"] == data.extract_answer(e["response"])
        assert data.is_correct(e["response"], e["answer"])
    assert negatives == 0  # no count goes below zero

def test_arith_default_is_short():
    exs = data.load_task("arith", "train", n=500, seed=0)
    mean = sum(len(e["prompt"] + e["response"]) for e in exs) / len(exs)
    assert mean < 170
    assert all(len(steps_of(e["response"])) == 2 for e in exs)
    assert all(int(e["answer"]) >= 0 for e in exs)

@pytest.mark.parametrize("knobs,match", [(dict(ops="+/"), "ops"), (dict(ops=""), "ops"),
                                         (dict(steps=(3, 2)), "steps"),
                                         (dict(max_number=0), "max_number"),
                                         (dict(ops="*", max_factor=1), "max_factor"),
                                         (dict(max_num=9), "unknown option.*max_num")])
def test_arith_bad_knobs(knobs, match):
    with pytest.raises(ValueError, match=match):
        data.load_task("arith", "train", n=10, **knobs)

def test_arith_too_small_space_raises():
    with pytest.raises(ValueError, match="distinct"):
        data.load_task("arith", "train", n=1000, steps=1, max_number=2, ops="+")

@pytest.mark.parametrize("knobs", [{}, dict(steps=(2, 4), ops="+-*", max_number=100)])
def test_arith_pairs(knobs):
    exs = data.load_task("arith", "train", n=200, seed=0, **knobs)
    pairs = data.make_arith_pairs(exs, seed=0)
    assert pairs == data.make_arith_pairs(exs, seed=0)
    for e, p in zip(exs, pairs):
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["prompt"] == e["prompt"] and p["chosen"] == e["response"]
        assert (data.is_correct(p["chosen"], e["answer"])
                and not data.is_correct(p["rejected"], e["answer"]))
        good, bad = steps_of(p["chosen"]), steps_of(p["rejected"])
        assert len(good) == len(bad)
        wrong = [k for k, (a, op, b, c) in enumerate(bad) if OPS[op](a, b) != c]
        assert len(wrong) == 1                                  # exactly one slip ...
        j = wrong[0]
        assert bad[:j] == good[:j] and 1 <= abs(bad[j][3] - good[j][3]) <= 3
        for k in range(j + 1, len(bad)):                        # ... carried through,
                                                                # all else consistent
            assert bad[k][0] == bad[k - 1][3]
        assert data.extract_answer(p["rejected"]) == str(bad[-1][3]) and int(bad[-1][3]) >= 0
        # same text apart from the numbers
        assert re.sub(r"\d+", "N", p["rejected"]) == re.sub(r"\d+", "N", p["chosen"])

def test_arith_pairs_need_steps():
    with pytest.raises(ValueError, match="row 0"):
        data.make_arith_pairs([dict(prompt="Question: q\nAnswer:", response=" It is 5.\n#### 5",
                                    answer="5")])


def test_a_sample_cut_at_max_new_tokens_is_neither_chosen_nor_rejected():
    """A sample that never reached its EOS is graded by the last number it got to; as a chosen
    response (an EOS after it) it would teach an answer the model never finished. The sampler
    says which ended (eval.complete), the pairs leave the others out and count them."""
    import eval as evaluate
    tok = get_tokenizer("byte")

    class Sampler(torch.nn.Module):  # sample j of each prompt: "2" and its EOS, or "2 and 3" cut
        config = type("Config", (), {"block_size": 64})

        def generate(self, prompts, max_new_tokens, **kwargs):
            ended = tok.encode("The answer is 2") + [tok.eot_token]
            cut = tok.encode("The answer is 2 and 3 and")[:max_new_tokens]
            return [ended if j % 2 == 0 else cut for j in range(len(prompts))]

    samples, _, finished = evaluate.complete(Sampler(), tok, ["1+1?"], n=4, max_new_tokens=25,
                                             progress=False)
    assert finished == [[True, False, True, False]]
    record = dict(prompt="1+1?", answer="2", kind="gsm8k", samples=samples[0], finished=finished[0])
    record["samples"][0] = "The answer is 5"  # a finished wrong answer: the pair's rejected
    (pair,), stats = data.pairs_from_samples([record])
    assert (pair["chosen"], pair["rejected"]) == ("The answer is 2", "The answer is 5")
    assert stats["unfinished_samples"] == 2 and stats["sample_accuracy"] == 0.25
    record["samples"][2] = "The answer is 7"  # only the cut samples reached 2 (graded: their 3)
    assert data.pairs_from_samples([record])[0] == []


# -----------------------------------------------------------------------------
# grading

@pytest.mark.parametrize("text,answer,fallback", [
    ("so 3+4=7.\n#### 7", "7", False),
    ("#### 1,000.", "1000", False),
    ("#### 1,234,567", "1234567", False),
    ("#### -3", "-3", False),
    ("#### -0", "0", False),
    ("#### +5", "5", False),
    ("#### 7.50", "7.5", False),
    ("#### 5.0", "5", False),
    ("#### $18.00", "18", False),
    ("#### 18 dollars", "18", False),
    ("#### -$4", "-4", False),
    ("#### \u22122", "-2", False),
    ("#### 12\n#### 13", "13", False),                  # the LAST ####
    ("it costs 5 then #### 8 or 9", "8", False),        # first number after it
    ("####", None, False),
    ("no numbers here", None, True),
    ("", None, True),
    ("He has 20-3=17 apples.", "17", True),             # fallback: last number, flagged
    ("The answer is 20-3", "3", True),                  # "-" after a digit is an operator
    ("so the total is $1,250.", "1250", True),
    # stray Question: ignored
    (" 3+4=7.\n#### 7\n\nQuestion: Ann has 99 pens.\nAnswer: #### 99", "7", False),
    (" So 12.\nQuestion: Tom has 50 pens. #### 50", "12", True),
    # fractions are numbers, in lowest terms (they were read as their numerator)
    ("#### 3/4", "3/4", False), ("#### -6/8", "-3/4", False), ("#### 8/2", "4", False),
    ("#### 3/0", None, False), ("so 48/2 = 24\n#### 24", "24", False),
    ("Each gets \\boxed{1/3} of it.", "1/3", False),
    # a decimal without its leading 0 (it was read as 5 and 75)
    ("#### .5", "0.5", False), ("#### $.75", "0.75", False), ("#### -.5", "-0.5", False),
    ("so each gets .25 of it", "0.25", True), ("wait...5 more", "5", True),
])
def test_extract_answer(text, answer, fallback):
    assert data.extract_answer_ex(text) == (answer, fallback)
    assert data.extract_answer(text) == answer

@pytest.mark.parametrize("completion,gold,ok", [
    ("#### 7.50", "7.5", True), ("#### 18", "18.0", True), ("#### 1,000", "1000", True),
    ("#### -0", "0", True), ("#### 17", "18", False), ("no answer", "18", False),
    ("the answer is 18", "18", True), ("#### 18", 18, True),
    ("#### 18\nQuestion: #### 19", "19", False),
    # exact rationals: a gold "#### 3/4" is 3/4, not 3
    ("#### 3/4", "#### 3/4", True), ("#### 0.75", "3/4", True), ("#### 6/8", "0.75", True),
    ("#### 3", "#### 3/4", False), ("#### 0.3333", "1/3", False),
    ("#### 0.5", "#### .5", True), ("#### .5", "1/2", True), ("#### .5", "5", False),
])
def test_is_correct(completion, gold, ok):
    assert data.is_correct(completion, gold) is ok

# -----------------------------------------------------------------------------
# tokenizers, masks and the label shift

def test_tokenizers():
    byte = get_tokenizer("byte")
    assert byte.n_vocab == 257 and byte.eot_token == 256
    s = "Héllo 🙂\r\n\t 12+7=19\n#### 5 <|endoftext|>"
    ids = byte.encode_ordinary(s)
    assert len(ids) == len(s.encode()) and byte.decode(ids) == s
    assert byte.decode([byte.eot_token]) == "<|endoftext|>"
    gpt2 = get_tokenizer("gpt2")
    assert (gpt2.n_vocab == 50257 and gpt2.eot_token == 50256
            and gpt2.decode(gpt2.encode_ordinary(s)) == s)
    with pytest.raises(ValueError, match="'gpt2', 'byte'"):
        get_tokenizer("llama")

EXAMPLES = [dict(prompt="Question: Tom has 12 pens.\nAnswer:", response=" 12+7=19.\n#### 19"),
            dict(prompt="Question: hi\nAnswer:",
                 response=" A much longer response, with words.\n#### 1,000"),
            # BPE would merge "hel"+"lo" if joined first
            dict(prompt="say hel", response="lo world")]

@pytest.mark.parametrize("name", ["byte", "gpt2"])
def test_sft_mask_and_shift(name):
    tok = get_tokenizer(name)
    rows, stats = data.encode_sft(EXAMPLES, tok, max_len=256)
    assert stats == dict(rows=3, kept=3, truncated=0, prompt_truncated=0, response_truncated=0,
                         dropped=0)
    batch = data.sft_batch(rows, pad_id=tok.eot_token)
    x, y, m = batch["input_ids"], batch["targets"], batch["loss_mask"]
    assert (x.shape == y.shape == m.shape
            and x.dtype == y.dtype == torch.long and m.dtype == torch.bool)
    assert torch.equal(y[:, :-1], x[:, 1:]) and (y[:, -1] == tok.eot_token).all()
    for b, (ex, row) in enumerate(zip(EXAMPLES, rows)):
        p, r = tok.encode_ordinary(ex["prompt"]), tok.encode_ordinary(ex["response"])
        # separately tokenised
        assert row["prompt_ids"] == p and row["response_ids"] == r + [tok.eot_token]
        assert x[b, :len(p) + len(r) + 1].tolist() == p + r + [tok.eot_token]
        cols = m[b].nonzero().squeeze(1).tolist()
        # exactly the response + EOS targets
        assert cols == list(range(len(p) - 1, len(p) + len(r)))
        assert tok.decode(y[b][m[b]].tolist()) == ex["response"] + "<|endoftext|>"

def test_bpe_boundary():
    tok = get_tokenizer("gpt2")
    ex = EXAMPLES[2]
    joined = tok.encode_ordinary(ex["prompt"] + ex["response"])
    split = tok.encode_ordinary(ex["prompt"]) + tok.encode_ordinary(ex["response"])
    assert joined != split                                      # the case really merges
                                                                # across the boundary
    rows, _ = data.encode_sft([ex], tok, max_len=64)
    assert rows[0]["prompt_ids"] + rows[0]["response_ids"] == split + [tok.eot_token]

PAIRS = [dict(prompt="Question: 2+2?\nAnswer:", chosen=" 2+2=4.\n#### 4",
              rejected=" 2+2=5, as everyone knows.\n#### 5"),
         dict(prompt="Question: a long one?\nAnswer:", chosen=" yes, the long one.\n#### 1",
              rejected=" no.\n#### 2")]

@pytest.mark.parametrize("name", ["byte", "gpt2"])
@pytest.mark.parametrize("eos_pad", [False, True])
def test_preference_batch(name, eos_pad):
    tok = get_tokenizer(name)
    eot = tok.eot_token
    rows, _ = data.encode_pairs(PAIRS, tok, max_len=128)
    batch = data.preference_batch(rows, pad_id=eot, eos_pad=eos_pad)
    x, y, m = batch["input_ids"], batch["targets"], batch["loss_mask"]
    B = len(PAIRS)
    assert x.shape[0] == 2 * B and torch.equal(y[:, :-1], x[:, 1:])
    for i, pair in enumerate(PAIRS):
        p = tok.encode_ordinary(pair["prompt"])
        c, r = (tok.encode_ordinary(pair[k]) + [eot] for k in ("chosen", "rejected"))
        L = max(len(c), len(r))
        for row, resp in ((i, c), (B + i, r)):                  # chosen rows first, then rejected
            assert x[row, :len(p)].tolist() == p
            n = L if eos_pad else len(resp)
            assert m[row].sum().item() == n and m[row].nonzero()[0].item() == len(p) - 1
            scored = y[row][m[row]].tolist()
            assert scored[:len(resp)] == resp and scored[len(resp):] == [eot] * (n - len(resp))
        if eos_pad:
            assert m[i].sum() == m[B + i].sum()                 # equal response lengths
                                                                # within a pair
    assert not eos_pad or batch["input_ids"].shape[1] <= 128

def test_pad_to():
    tok = get_tokenizer("byte")
    rows, _ = data.encode_sft(EXAMPLES, tok, max_len=100)
    longest = max(data.row_lengths(rows))
    assert data.sft_batch(rows, tok.eot_token)["input_ids"].shape[1] == longest
    assert longest % 16 and (data.sft_batch(rows, tok.eot_token, pad_to=16)["input_ids"].shape[1]
                             == -(-longest // 16) * 16)
    assert data.sft_batch(rows[:1], tok.eot_token, pad_to=64)["input_ids"].shape[1] == 64
    rows, _ = data.encode_sft([dict(prompt="p" * 10, response="r" * 80)], tok, max_len=100)
    # capped
    assert data.sft_batch(rows, tok.eot_token, pad_to=64, max_len=100)["input_ids"].shape[1] == 100
    assert data.sft_batch(rows, tok.eot_token, pad_to=64)["input_ids"].shape[1] == 128

# -----------------------------------------------------------------------------
# truncation

def test_truncation_rule():
    tok = get_tokenizer("byte")
    prompt = "".join(chr(ord("a") + i % 26) for i in range(100))
    items = [dict(prompt=prompt, response="x" * 10),              # fits: 100 + 11 <= 128, untouched
             dict(prompt=prompt, response="y" * 40),              # too long: prompt cut to 64,
                                                                  # keeping its end
             dict(prompt="short", response="z" * 200)]            # response cut to fit
    rows, stats = data.encode_sft(items, tok, max_len=128, verbose=False)
    assert stats == dict(rows=3, kept=3, truncated=2, prompt_truncated=1, response_truncated=1,
                         dropped=0)
    assert rows[0]["prompt_ids"] == list(prompt.encode())
    assert tok.decode(rows[1]["prompt_ids"]) == prompt[-64:] and len(rows[1]["response_ids"]) == 41
    assert len(rows[2]["prompt_ids"]) + len(rows[2]["response_ids"]) == 128
    assert rows[2]["response_ids"][-1] != tok.eot_token           # a cut response has no EOS
    assert all(len(r["prompt_ids"]) + len(r["response_ids"]) <= 128 for r in rows)
    # pairs: both responses cut to the same room
    rows, stats = data.encode_pairs([dict(prompt=prompt, chosen="c" * 100, rejected="r" * 5)],
                                    tok, max_len=128)
    assert stats["prompt_truncated"] == 1 and len(rows[0]["prompt_ids"]) == 64
    assert len(rows[0]["chosen_ids"]) == 64 and len(rows[0]["rejected_ids"]) == 6

def test_truncation_drops_are_counted(capsys):
    tok = get_tokenizer("byte")
    items = [dict(prompt="p" * 50, response="ok"),
             dict(prompt="q" * 200, response="lost"),
             dict(prompt="p", response="ok")]
    rows, stats = data.encode_sft(items, tok, max_len=64, max_prompt_len=64)
    assert stats["dropped"] == 1 and stats["kept"] == 2 and [r["idx"] for r in rows] == [0, 2]
    assert "1 rows dropped" in capsys.readouterr().out           # reported, never silent
    with pytest.raises(ValueError, match="max_prompt_len"):
        data.encode_sft(items, tok, max_len=64, max_prompt_len=65)

def test_encode_bad_rows():
    tok = get_tokenizer("byte")
    with pytest.raises(ValueError, match="pairs row 1: field 'chosen' is empty"):
        data.encode_pairs([PAIRS[0], dict(PAIRS[0], chosen="  ")], tok, max_len=64)
    with pytest.raises(ValueError, match="sft data row 0: field 'response' is an int"):
        data.encode_sft([dict(prompt="p", response=3)], tok, max_len=64)

# -----------------------------------------------------------------------------
# length-grouped batches

def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(1234)]
    batches = data.length_grouped_batches(lengths, batch_size=8, seed=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1234))                      # every index exactly once
    assert sum(len(b) < 8 for b in batches) == 1                  # the partial batch is kept
    assert batches == data.length_grouped_batches(lengths, batch_size=8, seed=0)
    assert batches != data.length_grouped_batches(lengths, batch_size=8, seed=1)
    maxes = [max(lengths[i] for i in b) for b in batches[:50]]
    assert maxes != sorted(maxes, reverse=True)                   # the batches themselves
                                                                  # are shuffled
    # grouping works: far less padding than random batches
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                         for b in bs)
    random_batches = [list(range(k, min(k + 8, 1234))) for k in range(0, 1234, 8)]
    assert pad(batches) < pad(random_batches) / 5
    for b in batches:  # each batch from one chunk of 400 shuffled rows, sorted longest first
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert data.length_grouped_batches([], 4, seed=0) == []

# -----------------------------------------------------------------------------
# local files through `datasets`

GSM = [{"question": "Natalia sold clips to 48 of her friends in April, "
                    "and then she sold half as many in May. "
                    "How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
                  "#### 72"},
       {"question": "  What is 1,000 + 234?  ",
        "answer": "1,000+234=<<1000+234=1234>>1,234\n#### 1,234"}]

def test_local_gsm8k_jsonl(tmp_path):
    os.makedirs(tmp_path / "gsm")  # a folder holding {split}.jsonl: the file is that split
    write_jsonl(tmp_path / "gsm" / "test.jsonl", GSM)
    folder = str(tmp_path / "gsm")
    exs = data.load_task(folder, "test")
    assert [e["answer"] for e in exs] == ["72", "1234"]
    assert exs[0]["prompt"] == "Question: " + GSM[0]["question"] + "\nAnswer:"
    assert exs[0]["response"] == " Natalia sold 48/2 = 24 clips in May.\n" \
                                 "Natalia sold 48+24 = 72 clips altogether in April and May.\n" \
                                 "#### 72"
    assert exs[1]["question"] == "What is 1,000 + 234?"
    assert all(data.is_correct(e["response"], e["answer"]) for e in exs)
    assert len(data.load_task(folder, "test", n=1)) == 1
    with pytest.raises(ValueError, match="unknown option"):
        data.load_task(folder, "test", steps=3)


def test_a_single_file_is_split_into_disjoint_train_and_test(tmp_path):
    """The README's local-data example: one file for both splits. The test questions are the ones
    a hash of the text picks (as for arith), never training questions, whatever the row order;
    a repeated question is kept once."""
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}
            for i in range(200)]
    path = write_jsonl(tmp_path / "all.jsonl", rows + rows[:30] + rows[::-1])
    train = data.load_task(path, "train")
    test = data.load_task(path, "test")
    questions = [e["question"] for e in train + test]
    assert len(questions) == len(set(questions)) == 200  # disjoint, duplicates once, none lost
    assert 5 <= len(test) <= 40  # about 1 in 10
    assert all(data._is_test_question(e["question"]) for e in test)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    assert {e["question"] for e in data.load_task(shuffled, "test")} == {e["question"] for e in test}
    assert data.load_task(path, "test", n=3) == test[:3]


def test_a_repeated_question_is_scored_once_and_two_answers_to_it_are_refused(tmp_path, capsys):
    """A test file's repeated question was scored once per copy, even with two different golds."""
    folder = tmp_path / "task"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [GSM[0], GSM[1], dict(GSM[0], answer="#### 72")])
    assert [e["answer"] for e in data.load_task(str(folder), "test")] == ["72", "1234"]
    assert "test.jsonl: 1 repeated question(s), each kept once" in \
        capsys.readouterr().out
    write_jsonl(folder / "test.jsonl", [GSM[0], GSM[1], dict(GSM[0], answer="#### 73")])
    with pytest.raises(ValueError, match=r"test.jsonl rows 0 and 2: the same question with two "
                                         r"answers \('72' and '73'\)"):
        data.load_task(str(folder), "test")
    # MATH's answers are the same when they are equal as mathematics
    rows = [dict(problem="Half of 1?", solution=r"It is \boxed{\frac12}."),
            dict(problem="Half of 1?", solution=r"It is \boxed{0.5}."),
            dict(problem="Half of 1?", solution=r"It is \boxed{2}.")]
    write_jsonl(folder / "test.jsonl", rows[:2])
    assert len(data.load_task(str(folder), "test")) == 1
    write_jsonl(folder / "test.jsonl", rows)
    with pytest.raises(ValueError, match=r"test.jsonl rows 0 and 2: the same question"):
        data.load_task(str(folder), "test")


def test_a_hub_dataset_that_contradicts_itself_keeps_the_first_answer_and_says_so(
        monkeypatch, capsys):
    """A hub dataset cannot be edited by its user: its first answer is kept, both rows named."""
    rows = [GSM[0], GSM[1], dict(GSM[0], answer="#### 73")]
    monkeypatch.setattr(data, "load_table", lambda name, split, config: (
        rows, list(GSM[0]), f"{name} ({split})"))
    assert [e["answer"] for e in data.load_task("someone/math", "test")] == ["72", "1234"]
    assert "someone/math (test) rows 0 and 2: the same question with two answers ('72' and " \
           "'73'): row 0's is kept" in capsys.readouterr().out

def test_local_gsm8k_bad_answer(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [GSM[0], {"question": "q", "answer": "it is 5"}])
    with pytest.raises(ValueError, match=r"gsm.jsonl row 1: field 'answer' has no '#### <number>'"):
        data.load_task(path, "test")
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "solution": "#### 5"}])
    with pytest.raises(ValueError, match=r"qa.jsonl: missing column\(s\) 'answer' "
                                         r"\(found: 'question', 'solution'\)"):
        data.load_task(path, "test")

PREFS = [{"prompt": "Question: 2+2?\nAnswer:", "chosen": " 4", "rejected": " 5"},
         {"prompt": "Hi", "chosen": " there", "rejected": " you"}]

def test_local_pair_files(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", PREFS)
    assert data.load_pairs(path) == PREFS
    path = write(tmp_path / "prefs.json", json.dumps(PREFS))
    assert data.load_pairs(path) == PREFS
    path = write(tmp_path / "prefs.csv",
                 'prompt,chosen,rejected\n"Question: 2+2?\nAnswer:", 4, 5\nHi, there, you\n')
    assert data.load_pairs(path) == PREFS
    # cells stay text
    path = write(tmp_path / "nums.csv", "prompt,chosen,rejected\nWhat is 2+2?,4,5\n")
    assert data.load_pairs(path) == [dict(prompt="What is 2+2?", chosen="4", rejected="5")]
    with pytest.raises(ValueError, match=r"gaps.csv row 1: field 'chosen' is missing"):
        data.load_pairs(write(tmp_path / "gaps.csv", "prompt,chosen,rejected\np,c,r\nq,,r\n"))
    pq.write_table(pa.Table.from_pylist(PREFS), tmp_path / "prefs.parquet")
    assert data.load_pairs(str(tmp_path / "prefs.parquet")) == PREFS

def test_a_csv_cell_reading_na_or_none_is_text_and_only_an_empty_one_is_missing(tmp_path):
    """pandas reads "N/A", "NA", "None", "null", "nan"... as missing: an answer can be that text."""
    path = write(tmp_path / "na.csv", "prompt,chosen,rejected\nIs it known?,N/A,None\n"
                                      "And this?,NA,null\nOr?,nan,#N/A\n")
    assert [(p["chosen"], p["rejected"]) for p in data.load_pairs(path)] == \
        [("N/A", "None"), ("NA", "null"), ("nan", "#N/A")]
    task = write(tmp_path / "task.csv", "question,answer\nNA,#### 1\nnull,#### 2\n")
    assert {e["question"] for e in data.load_task(task, "train") + data.load_task(task, "test")} \
        == {"NA", "null"}
    with pytest.raises(ValueError, match=r"gaps.csv row 0: field 'rejected' is missing"):
        data.load_pairs(write(tmp_path / "gaps.csv", "prompt,chosen,rejected\np,N/A,\n"))

@pytest.mark.parametrize("rows,match", [
    ([PREFS[0], {"prompt": "p", "chosen": "", "rejected": "r"}],
     r"prefs.jsonl row 1: field 'chosen' is empty \(expected a non-empty string\)"),
    ([PREFS[0], PREFS[1], {"prompt": "p", "chosen": "c", "rejected": 5}],
     r"prefs.jsonl row 2: field 'rejected' is an int"),
    ([{"prompt": "p", "chosen": "c", "rejected": 5}],
     r"prefs.jsonl row 0: field 'rejected' is an int"),
    ([PREFS[0], {"prompt": "p", "chosen": ["c"], "rejected": "r"}],
     r"prefs.jsonl row 1: field 'chosen' holds a message that is not \{role"),
    ([PREFS[0], {"prompt": None, "chosen": "c", "rejected": "r"}],
     r"prefs.jsonl row 1: field 'prompt' is missing"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}],
     r"prefs.jsonl row 0: chosen and rejected are identical"),
    ([{"prompt": "p", "chosen": "c"}], r"prefs.jsonl: missing column\(s\) 'rejected'"),
])
def test_bad_pair_rows(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        data.load_pairs(path)

@pytest.mark.parametrize("row,near", [
    # read as HH-RLHF (no prompt column): the questions were cut off as the shared prefix
    ({"promt": "Q: 2+2?", "chosen": "Q: 2+2? 4", "rejected": "Q: 2+2? 5"}, ("promt", "prompt")),
    # ... or the error blamed "no shared prefix"
    ({"promt": "Q", "chosen": "4", "rejected": "5"}, ("promt", "prompt")),
    ({"prompt": "Q", "choosen": "4", "rejected": "5"}, ("choosen", "chosen")),
])
def test_a_misspelled_pair_column_is_named_with_its_close_match(tmp_path, row, near):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(ValueError, match=rf"pairs.jsonl: column '{near[0]}' is not '{near[1]}' "
                                         rf"\(columns are matched exactly: rename it"):
        data.load_pairs(path)

def test_a_misspelled_task_column_is_named_and_other_columns_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "task.jsonl", [{"questoin": "1+1?", "answer": "#### 2"}])
    with pytest.raises(ValueError, match=r"task.jsonl: column 'questoin' is not 'question'"):
        data.load_task(path, "train")
    # a MATH file's answer column misspelled was ignored: the gold came from the solution's box
    row = {"problem": "p", "solution": r"so \boxed{1}", "anwser": "2"}
    path = write_jsonl(tmp_path / "math.jsonl", [row])
    with pytest.raises(ValueError, match=r"math.jsonl: column 'anwser' is not 'answer'"):
        data.load_task(path, "train")
    # decision: columns named after a used one, and the others, are the file's own
    pairs = [dict(PREFS[0], prompt_id="a1", score_chosen=8.5, messages=[])]
    assert data.load_pairs(write_jsonl(tmp_path / "extra.jsonl", pairs)) == [PREFS[0]]

def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_pairs(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match=r"prefs.txt: unsupported file type '.txt'"):
        data.load_pairs(write(tmp_path / "prefs.txt", "hello"))
    with pytest.raises(ValueError, match=r"latin.jsonl: not valid UTF-8"):
        data.load_pairs(write(tmp_path / "latin.jsonl",
                              '{"prompt": "caf\xe9"}\n'.encode("latin-1"), "wb"))
    with pytest.raises(ValueError, match=r"latin.csv: not valid UTF-8"):
        data.load_task(write(tmp_path / "latin.csv",
                             "question,answer\ncaf\xe9,#### 1\n".encode("latin-1"), "wb"))
    with pytest.raises(ValueError, match=r"empty.jsonl: file is empty"):
        data.load_pairs(write(tmp_path / "empty.jsonl", ""))
    with pytest.raises(ValueError, match=r"broken.jsonl: could not read it as jsonl"):
        data.load_pairs(write(tmp_path / "broken.jsonl", '{"prompt": "p", "chosen": \n'))
    with pytest.raises(ValueError, match=r"garbage.parquet: could not read it as parquet"):
        data.load_pairs(write(tmp_path / "garbage.parquet", b"not a parquet file", "wb"))
    with pytest.raises(FileNotFoundError, match=r"no train.jsonl"):
        data.load_pairs(str(tmp_path))

# characters str.splitlines breaks at but JSON Lines do not (lines end at "\n" only): a JSON
# string may hold the first three raw, and our writer writes them so
LINE_BREAKS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"

def test_jsonl_holding_unicode_line_breaks_is_read_back_as_the_project_wrote_it(tmp_path):
    """Pair files the pairs stage writes (common.write_jsonl) are read back by eval.py --pairs:
    they were refused as invalid JSON when a text held U+2028."""
    pairs = [dict(prompt=f"Q{k}{c}?", chosen=f" a{c}b", rejected=f" c{c}")
             for k, c in enumerate(LINE_BREAKS)]
    for name in ("pairs.jsonl", "pairs.json"):
        common.write_jsonl(pairs, tmp_path / name)
        assert data.load_pairs(str(tmp_path / name)) == pairs
        assert common.read_jsonl(tmp_path / name) == pairs
    rows = [{"question": f"What is {k}{c}+1?", "answer": f"#### {k + 1}"}
            for k, c in enumerate(LINE_BREAKS)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                 for r in rows), encoding="utf-8")
    task = data.load_task(str(tmp_path / "task.jsonl"), "train")
    task += data.load_task(str(tmp_path / "task.jsonl"), "test")
    assert sorted(e["question"] for e in task) == sorted(r["question"] for r in rows)

def test_jsonl_with_a_bom_and_windows_line_ends_is_read(tmp_path):
    """A UTF-8 BOM (Windows editors write one) was refused as invalid JSON."""
    path = write(tmp_path / "bom.jsonl", "\ufeff" + "".join(json.dumps(p) + "\r\n" for p in PREFS))
    assert data.load_pairs(path) == PREFS == common.read_jsonl(path)

def test_a_file_holding_no_rows_is_refused_as_such(tmp_path):
    """A CSV header, blank lines or [] only: datasets said 'Instruction "train" corresponds to no
    data!'."""
    for name, text in (("header.csv", "prompt,chosen,rejected\n"), ("empty.json", "[]"),
                       ("blank.jsonl", "\n\n")):
        with pytest.raises(ValueError, match=rf"{name}: no rows in it"):
            data.load_pairs(write(tmp_path / name, text))
    with pytest.raises(ValueError, match=r"task.csv: no rows in it \(a header only\)"):
        data.load_task(write(tmp_path / "task.csv", "question,answer\r\n"), "train")

def test_a_column_or_field_named_twice_is_refused_not_read_as_one_of_them(tmp_path):
    """A CSV header naming 'chosen' twice was read as its first column (pandas renamed the second
    'chosen.1', which nothing reads); a JSON object naming a field twice, as its last value. Which
    one the author meant is unknowable: the file and the name are given instead."""
    csv_file = write(tmp_path / "twice.csv", "prompt,chosen,chosen,rejected\np,a,b,r\n")
    with pytest.raises(ValueError, match=r"twice.csv: column 'chosen' appears twice in the head"):
        data.load_pairs(csv_file)
    row = '{"prompt": "p", "chosen": " a", "rejected": " r", "chosen": " b"}'
    with pytest.raises(ValueError, match=r"twice.jsonl: could not read it as jsonl \(line 2: "
                                         r"field 'chosen' appears twice in one object"):
        data.load_pairs(write(tmp_path / "twice.jsonl", json.dumps(PREFS[0]) + "\n" + row))
    with pytest.raises(ValueError, match=r"twice.json: could not read it as json \(field 'chosen' "
                                         r"appears twice"):
        data.load_pairs(write(tmp_path / "twice.json", f"[{row}]"))
    nested = {"messages": [{"role": "user", "content": "hi"}]}
    assert common.read_jsonl(write(tmp_path / "ok.jsonl", json.dumps(nested))) == [nested]

def test_a_parquet_file_without_rows_says_so(tmp_path):
    """It was "could not read it as parquet (DatasetGenerationError ... <- ArrowInvalid: BatchSize
    must be greater than 0, got 0)", after a line of datasets' own on stderr."""
    empty = pa.Table.from_pylist([], schema=pa.Table.from_pylist(PREFS).schema)
    pq.write_table(empty, tmp_path / "prefs.parquet")
    with pytest.raises(ValueError, match=r"prefs.parquet: no rows in it$"):
        data.load_pairs(str(tmp_path / "prefs.parquet"))
    write(tmp_path / "broken.parquet", "PAR1 not really")
    with pytest.raises(ValueError, match=r"broken.parquet: could not read it as parquet \("):
        data.load_pairs(str(tmp_path / "broken.parquet"))

def test_a_csv_with_a_bom_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: it was refused (KeyError: '\\ufeffprompt')."""
    path = tmp_path / "excel.csv"
    path.write_text("prompt,chosen,rejected\r\nHi, there, you\r\n", encoding="utf-8-sig")
    assert data.load_pairs(str(path)) == [PREFS[1]]

def test_a_lone_surrogate_is_named_with_its_line_and_field(tmp_path):
    """JSON's \\ud800 escape parses, but half of a UTF-16 pair is not text: the error was
    "Trailing data at position 179", with no line and no cause. A whole pair is an emoji."""
    ok = '{"prompt": "Hi \\ud83d\\ude00", "chosen": " a", "rejected": " b"}'
    bad = '{"prompt": "Hi", "chosen": " a \\ud800", "rejected": " b"}'
    path = write(tmp_path / "prefs.jsonl", f"{ok}\n{bad}\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl: could not read it as jsonl \(line 2: "
                                         r"field 'chosen' holds a lone UTF-16 surrogate"):
        data.load_pairs(path)
    assert data.load_pairs(write(tmp_path / "ok.jsonl", ok))[0]["prompt"] == "Hi \U0001f600"
    with pytest.raises(ValueError, match=r"prefs.json: could not read it as json \(row 1: "
                                         r"field 'chosen' holds a lone UTF-16 surrogate"):
        data.load_pairs(write(tmp_path / "prefs.json", f"[{ok}, {bad}]"))
    with pytest.raises(ValueError, match=r"prefs.jsonl: could not read it as jsonl \(line 2"):
        common.read_jsonl(tmp_path / "prefs.jsonl")

# -----------------------------------------------------------------------------
# HH-RLHF style rows and chat messages

def test_hh_rlhf_split(tmp_path):
    convo = "\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant:"
    rows = [{"chosen": convo + " It is six.",
             "rejected": convo + " It is seven."},    # backs off to the marker
            {"chosen": "The sky is blue",
             "rejected": "The sky is green"}]         # no marker: longest prefix
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    pairs = data.load_pairs(path)
    assert pairs[0] == dict(prompt=convo, chosen=" It is six.", rejected=" It is seven.")
    assert pairs[1] == dict(prompt="The sky is ", chosen="blue", rejected="green")
    for row, p in zip(rows, pairs):
        assert (p["prompt"] + p["chosen"] == row["chosen"]
                and p["prompt"] + p["rejected"] == row["rejected"])
    for bad, match in [({"chosen": "abc", "rejected": "xyz"}, "no prefix"),
                       ({"chosen": "abc", "rejected": "abcdef"}, "prefix of the other")]:
        with pytest.raises(ValueError, match="hh2.jsonl row 0: .*" + match):
            data.load_pairs(write_jsonl(tmp_path / "hh2.jsonl", [bad]))

def test_chat_messages(tmp_path):
    user = {"role": "user", "content": "Hi?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "Hello."}],
             "rejected": [user, {"role": "assistant", "content": "Go away."}]}]
    messages = dict(prompt=[user], chosen=[{"role": "assistant", "content": "Hello."}],
                    rejected=[{"role": "assistant", "content": "Go away."}])
    assert data.load_pairs(write_jsonl(tmp_path / "chat.jsonl", rows)) == [messages]
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}]
    assert data.load_pairs(write_jsonl(tmp_path / "chat2.jsonl", rows)) == [messages]
    # a model without a chat template: HH-RLHF's text (a template: see test_first_hour.py)
    want = dict(prompt="\n\nHuman: Hi?\n\nAssistant:", chosen=" Hello.", rejected=" Go away.")
    assert data.render_pairs([messages], get_tokenizer("byte")) == [want]
    rows = [{"chosen": [{"role": "robot", "content": "x"}],
             "rejected": [{"role": "robot", "content": "y"}]}]
    with pytest.raises(ValueError, match="chat3.jsonl row 0: field 'chosen' holds a message"):
        data.load_pairs(write_jsonl(tmp_path / "chat3.jsonl", rows))

def test_chat_pairs_without_a_prompt_are_split_at_the_last_user_turn(tmp_path):
    """The prompt was the messages chosen and rejected share: when they shared only the system
    turn, the two questions became the 'responses' (cut inside the user's turn, as text)."""
    system, q, a = ({"role": r, "content": c} for r, c in
                    (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")))
    rows = [{"chosen": [system, q, a], "rejected": [system, q, dict(a, content="5")]},
            {"chosen": [q, a, q, a], "rejected": [q, a, q, dict(a, content="5")]}]
    pairs = data.load_pairs(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert [p["prompt"] for p in pairs] == [[system, q], [q, a, q]]
    assert data.render_pairs(pairs[:1], get_tokenizer("byte"), verbose=False) == [dict(
        prompt="\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:", chosen=" 4", rejected=" 5")]
    for bad, match in [
            ({"chosen": [system, q, a], "rejected": [system, dict(q, content="3+3?"), a]},
             r"chosen and rejected differ before their last assistant turn \(message 1, "
             r"the user's\)"),
            ({"chosen": [q, a], "rejected": [q, dict(a, content="5"), q, a]},
             r"chosen and rejected differ before their last assistant turn \(message 1"),
            ({"chosen": [system, a], "rejected": [system, dict(a, content="5")]},
             r"no user turn in chosen")]:
        with pytest.raises(ValueError, match=r"chat2.jsonl row 1: " + match):
            data.load_pairs(write_jsonl(tmp_path / "chat2.jsonl", rows[:1] + [bad]))
    # with a prompt column, a response holding a user turn is another conversation too
    rows = [{"prompt": [system], "chosen": [q, a], "rejected": [dict(q, content="3+3?"), a]}]
    with pytest.raises(ValueError, match=r"chat3.jsonl row 0: field 'chosen' holds a user turn "
                                         r"\(message 0\)"):
        data.load_pairs(write_jsonl(tmp_path / "chat3.jsonl", rows))
