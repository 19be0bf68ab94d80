"""
Data for nanoADPO: tasks, preference pairs, grading, tokenization and batches.

Tasks (lists of example dicts: question, prompt, response, answer)
  - "arith": embedded, offline, seeded multi-step arithmetic word problems in GSM8K's format. Small
    enough that a tiny byte-level GPT trained from scratch on a laptop CPU learns part of it.
  - "gsm8k": the hub dataset openai/gsm8k (config "main"), or any local/hub table with the same
    `question` / `answer` columns. The `<<48/2=24>>` calculator annotations are stripped.
  - "math" / "math500": MATH's training problems, tested on MATH's test split or MATH-500; or any
    table with MATH's columns (problem, solution; answer, subject or type, level where there).
    The answers are LaTeX, graded by mathematical equivalence: is_correct(..., kind="math").

Prompt format (the same for every task):
    prompt   = "Question: {question}\nAnswer:"
    response = " " + worked solution, ending with a "#### <answer>" line
The model is trained on prompt + response + EOS; only the response and its EOS are scored.
A chat model (a Hugging Face tokenizer with a chat template, see HFTokenizer) gets the question
as the user's turn rendered by its template instead (chat_example), and its end-of-turn token
as the EOS.

Preference pairs (lists of dicts: prompt, chosen, rejected)
  - any table with prompt / chosen / rejected string columns (TRL's convention), local or hub;
  - HH-RLHF style rows with no prompt column, where chosen and rejected both hold the whole
    conversation: the prompt is their longest shared prefix, backed off to the end of the last
    "\n\nAssistant:" inside it;
  - chosen / rejected (and prompt) as lists of chat messages {role, content} (TRL's
    conversational format; without a prompt column, the prompt is the conversation up to its
    last user turn, which both must share): rendered for the model by render_pairs, through its
    chat template as TRL does, or without one as "\n\nHuman: ...\n\nAssistant: ..." text;
  - the arith task's offline pairs (make_arith_pairs): rejected = one arithmetic slip carried
    through.
Local files: .jsonl / .json (Python's json) / .parquet / .csv (`datasets`), read by tables.py. Rows
are numbered from 0.

Batch convention (what model.py / loss.py / train.py consume): right-padded (B, T) tensors
input_ids, targets, loss_mask with targets[:, t] = input_ids[:, t+1] (the last column's target is
the pad id) and loss_mask[:, t] True exactly where targets[:, t] is a response token or the
response's EOS. Pad id = EOS id, so the mask is explicit and never derived from the ids.
"""

import os
import random
import re
import zlib
from collections import Counter
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch

from machinery.tables import a_kind, bad_text, load_table, require_columns, text_field
from machinery.tokenizer import encode_prompt, encode_response, uses_chat

# -----------------------------------------------------------------------------
# prompt format and grading

def format_prompt(question):
    """The prompt every task uses; the response that follows starts with a space."""
    return f"Question: {question}\nAnswer:"

# decision: a chat model is asked for the format Qwen2.5/Qwen3 (and Llama-3's math answers) were
# tuned on, so zero-shot answers end in a gradeable \boxed{}. The worked solutions an SFT stage
# trains on keep their "#### 42" line; extract_answer reads both.
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

def chat_example(example, tok):
    """An example in a chat model's format: the question and CHAT_INSTRUCTION as the user's turn,
    rendered by the tokenizer's chat template up to the assistant's reply; the response is the
    reply (no leading space), which ends with the template's end-of-turn token (tok.eot_token)."""
    turn = {"role": "user", "content": f"{example['question']}\n{CHAT_INSTRUCTION}"}
    return dict(example, prompt=tok.render_chat([turn]), response=example["response"].lstrip())

# a number: "1,234", "-$7.50", "3/4", and ".5" (a decimal without its leading 0: 0.5; not the end
# of an ellipsis, "...5")
NUM_RE = re.compile(r"(?<!\w)[-+]?\$?(?:\d(?:[\d,]*\d)?(?:\.\d+)?|(?<!\.)\.\d+)(?:/\d+(?!\.\d))?")
# the final answer of instruct models told to box it: \boxed{42}, \boxed{\$1,000} (one level of
# nested braces, as in \boxed{\text{42}})
BOXED_RE = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
CALC_RE = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>

def normalize_number(s):
    """'1,234' -> '1234', '$7.50' -> '7.5', '5.0' -> '5', '-0' -> '0', '+3' -> '3', '6/8' -> '3/4',
    '8/2' -> '4', '.5' -> '0.5'; None if not a number (or a fraction over 0)."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if "/" in s:  # a fraction: exact, in lowest terms
        try:
            q = Fraction(s)
        except (ValueError, ZeroDivisionError):
            return None
        return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))                      # also turns -0 into 0
    return format(d.normalize(), "f")           # 7.50 -> 7.5, never exponent notation

def extract_answer_ex(text):
    """Final answer of a GSM8K-style solution -> (normalised answer or None, used_fallback).

    Only the text before a stray "Question:" is read (a sampled completion that runs on into a new
    question must not be graded on it). If "####" occurs, the answer is the first number after the
    LAST "####" (None if there is none there); else, if a \\boxed{...} occurs (what instruct models
    write when asked to box the answer), the first number in the last one. Otherwise we fall back
    to the last number in the text and say so (used_fallback=True): GSM8K practice for sampled
    completions, which may not follow the format exactly ("The answer is 42." ends with it).
    Pass the completion/solution, not the prompt."""
    text = text.replace("\u2212", "-")          # unicode minus
    stray = text.find("Question:", 1)
    if stray != -1:
        text = text[:stray]
    if "####" in text:
        m = NUM_RE.search(text.rsplit("####", 1)[1])
        return (normalize_number(m.group()) if m else None), False
    boxed = BOXED_RE.findall(text)
    if boxed:  # the first number in the LAST \boxed{...}
        m = NUM_RE.search(boxed[-1])
        return (normalize_number(m.group()) if m else None), False
    nums = NUM_RE.findall(text)
    return (normalize_number(nums[-1]) if nums else None), True

def extract_answer(text, kind="gsm8k"):
    """The final answer, as text: GSM8K's (extract_answer_ex without the flag: the fallback, the
    last number, IS used), or MATH's as math-verify reads it (kind "math"), None if none."""
    if kind == "math":
        return next((p for p in _math_answer(text) if isinstance(p, str)), None)
    return extract_answer_ex(text)[0]

def is_correct(completion, gold, kind="gsm8k"):
    """Whether the completion's final answer is the gold one. "gsm8k": equal numbers, compared as
    exact rationals ("7.50" == "7.5", "3/4" == "0.75"). "math": LaTeX answers equal mathematically, by math-verify (\\frac{1}{2} = 0.5 =
    \\dfrac12, intervals, \\sqrt, units and degrees dropped, several answers as a set)."""
    if kind not in GRADERS:
        raise ValueError(f"is_correct: kind must be one of {', '.join(GRADERS)}, got {kind!r}")
    if kind == "math":
        from math_verify import LatexExtractionConfig, parse, verify
        # the gold answer: LaTeX without delimiters (MATH-500's `answer`)
        target = parse(f"${gold}$", [LatexExtractionConfig()])
        pred = _math_answer(completion)
        return bool(target and pred) and verify(target, pred)
    pred = extract_answer(completion)
    gold = normalize_number(str(gold)) or extract_answer(str(gold))
    return pred is not None and gold is not None and Fraction(pred) == Fraction(gold)

# -----------------------------------------------------------------------------
# MATH: LaTeX answers, read and compared by math-verify (what lighteval and open-r1 grade with)

GRADERS = ("gsm8k", "math")

def grader(example):  # an example's (or a sampled record's) kind of answer: gsm8k or math
    return example.get("kind", "gsm8k")

def _math_answer(text):
    """math-verify's reading of a completion's final answer ([sympy value, its text], or []): the
    last \\boxed{} first, then its other anchors; nothing after a stray "Question:"."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    stray = text.find("Question:", 1)
    return parse(text[:stray] if stray != -1 else text,
                 [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()])

def _math_example(row, where, i):
    """A MATH-schema row -> an example: the solution is the response, the gold answer MATH-500's
    `answer` or else the solution's last \\boxed{}, subject (or MATH's `type`) and level (3 or
    "Level 3") kept. decision: the plain prompt asks for \\boxed{} too (CHAT_INSTRUCTION)."""
    from latex2sympy2_extended.math_normalization import extract_boxed_content
    problem, solution = text_field(row, "problem", where, i).strip(), text_field(row, "solution", where, i)
    answer = row.get("answer")
    if answer is None and "\\boxed" in solution:
        answer = extract_boxed_content(solution)
    if not str(answer if answer is not None else "").strip():
        raise ValueError(f"{where} row {i}: no final answer (an 'answer' field, or a \\boxed{{}} "
                         f"in 'solution')")
    example = dict(question=problem, prompt=format_prompt(f"{problem}\n{CHAT_INSTRUCTION}"),
                   response=" " + solution.strip(), answer=str(answer).strip(), kind="math")
    subject = row.get("subject") or row.get("type")
    level = re.search(r"\d+", str(row.get("level")))
    if subject:
        example["subject"] = str(subject)
    if level:
        example["level"] = int(level.group())
    return example

# (dataset, config) of each split on the hub: MATH-500 is a subset of MATH's test split
MATH_TRAIN = ("DigitalLearningGmbH/MATH-lighteval", "default")
MATH_TASKS = {"math": dict(train=MATH_TRAIN, test=MATH_TRAIN),
              "math500": dict(train=MATH_TRAIN, test=("HuggingFaceH4/MATH-500", None))}

def _hub_math(name, split):
    """The hub's rows of a split. decision: a test problem is left out of training (said so)."""
    if split not in MATH_TASKS[name]:
        raise ValueError(f"task {name}: no split {split!r} (expected train or test)")
    source, config = MATH_TASKS[name][split]
    rows, columns, where = load_table(source, split, config)
    if split == "train":
        test = {row.get("problem") for row in _hub_math(name, "test")[0]}
        kept = [row for row in rows if row.get("problem") not in test]
        if len(kept) < len(rows):
            print(f"{name}: {len(rows) - len(kept)} training problems are also test problems: "
                  f"left out of training")
        rows = kept
    return rows, columns, where

def _example(question, solution, answer):
    """steps: the solution's lines of reasoning (arith: its steps; GSM8K: its lines before the
    final answer), the length axis of a report (eval.BREAKDOWNS)."""
    steps = sum(1 for line in solution.splitlines() if line.strip() and not line.startswith("####"))
    return dict(question=question, prompt=format_prompt(question), response=" " + solution,
                answer=answer, steps=steps)

# -----------------------------------------------------------------------------
# the embedded "arith" task: short multi-step word problems in GSM8K's format, e.g.
#   Question: Tom has 12 pens. He buys 7, then gives away 5. How many does he have now?
#   Answer: He buys 7, so 12+7=19.
#   He gives away 5, so 19-5=14.
#   #### 14
# Each step line spells out "a+b=c", so a byte-level model can learn the digit arithmetic.

ARITH_DEFAULTS = dict(steps=(2, 2), max_number=50, ops="+-", max_factor=5)
ARITH_SIZES = dict(train=5000, test=500)        # default n per split
NAMES = [("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"),
         ("Ben", "he"), ("Eva", "she"), ("Max", "he"), ("Zoe", "she")]
OBJECTS = ["pens", "cards", "coins", "books", "eggs", "shells", "stamps", "apples"]
PHRASES = {"+": ["buys {}", "finds {}", "gets {}"],
           "-": ["gives away {}", "loses {}", "sells {}"],
           "*": ["multiplies them by {}"]}

def _arith_problem(rng, steps, max_number, ops, max_factor):
    """One problem -> (question, solution, answer),
    or None when a step cannot be drawn (caller retries)."""
    name, he = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    x = start = rng.randint(1, max_number)
    clauses, lines = [], []
    for _ in range(rng.randint(*steps)):
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, max_number)
            y = x + b
        elif op == "-":
            # never take away more than there is
            hi = min(max_number, x)
            if hi < 1:
                return None
            b = rng.randint(1, hi)
            y = x - b
        else:
            b = rng.randint(2, max_factor)
            y = x * b
        phrase = rng.choice(PHRASES[op]).format(b)
        clauses.append(phrase)
        lines.append(f"{he.capitalize()} {phrase}, so {x}{op}{b}={y}.")
        x = y
    question = (f"{name} has {start} {obj}. {he.capitalize()} {', then '.join(clauses)}. "
                f"How many does {he} have now?")
    return question, "\n".join(lines + [f"#### {x}"]), str(x)

def _is_test_question(question):
    # the split is a pure function of the question text: train and test are disjoint for every seed
    return zlib.crc32(question.encode()) % 10 == 0

def generate_arith(split="train", n=None, seed=0, **knobs):
    """n distinct arith examples of one split (default ARITH_SIZES),
    deterministic in (split, n, seed, knobs). Knobs (defaults in ARITH_DEFAULTS):
    steps: int or (min, max) steps per problem; max_number: largest start value and +/- operand;
    ops: subset of "+-*"; max_factor: largest multiplier for "*". A count never goes below 0."""
    if split not in ARITH_SIZES:
        raise ValueError(f"arith: unknown split {split!r} (choices: 'train', 'test')")
    unknown = set(knobs) - set(ARITH_DEFAULTS)
    if unknown:
        raise ValueError(f"arith: unknown option(s) {', '.join(sorted(unknown))} "
                         f"(choices: {', '.join(ARITH_DEFAULTS)})")
    knobs = {**ARITH_DEFAULTS, **knobs}
    steps, max_number, ops, max_factor = (knobs["steps"], knobs["max_number"], knobs["ops"],
                                          knobs["max_factor"])
    n = ARITH_SIZES[split] if n is None else n
    steps = (steps, steps) if isinstance(steps, int) else tuple(steps)
    if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"arith: steps must be an int >= 1 or (min, max) with 1 <= min <= max, "
                         f"got {steps}")
    if max_number < 1:
        raise ValueError(f"arith: max_number must be >= 1, got {max_number}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"arith: ops must be a non-empty subset of '+-*', got {ops!r}")
    if "*" in ops and max_factor < 2:
        raise ValueError(f"arith: max_factor must be >= 2, got {max_factor}")
    rng = random.Random(seed)                   # never the global RNG
    seen, out, tries = set(), [], 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"arith: found only {len(out)} distinct {split} problems "
                             f"of the {n} asked for; raise max_number or steps, or lower n")
        p = _arith_problem(rng, steps, max_number, ops, max_factor)
        if p is None or (split == "test") != _is_test_question(p[0]) or p[0] in seen:
            continue
        seen.add(p[0])
        out.append(_example(*p))
    return out

STEP_RE = re.compile(r"(-?\d+)([-+*])(\d+)=(-?\d+)")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

def make_arith_pairs(examples, seed=0):
    """Offline preference pairs: chosen = the correct solution; rejected = the same solution with
    ONE step's result off by a small nonzero delta, and that wrong value carried through the later
    steps (recomputed correctly from it) to a wrong final answer.
    -> list of dict(prompt, chosen, rejected)."""
    rng = random.Random(seed)
    pairs = []
    for i, ex in enumerate(examples):
        lines = ex["response"].split("\n")
        steps = [(k, m) for k, line in enumerate(lines) for m in [STEP_RE.search(line)] if m]
        if not steps:
            raise ValueError(f"arith pairs row {i}: the response has no 'a+b=c' step to get wrong")
        nonneg = all(int(m.group(4)) >= 0 for _, m in steps)
        j = rng.randrange(len(steps))
        deltas = [-3, -2, -1, 1, 2, 3]
        rng.shuffle(deltas)
        for d in deltas:
            new_lines, values, prev_old, prev_new = list(lines), [], None, None
            for s, (k, m) in enumerate(steps):
                a, op, b, y = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
                # this step reads the previous result: use the wrong one
                if s > j and a == prev_old:
                    a = prev_new
                new_y = y + d if s == j else (_APPLY[op](a, b) if s > j else y)
                new_lines[k] = lines[k][:m.start()] + f"{a}{op}{b}={new_y}" + lines[k][m.end():]
                values.append(new_y)
                prev_old, prev_new = y, new_y
            final = str(prev_new)
            # a plausible slip: the final answer is wrong,
            # and no count goes negative if none did before
            if final != ex["answer"] and not (nonneg and min(values) < 0):
                break
        else:
            raise ValueError(f"arith pairs row {i}: "
                             f"found no slip that makes the final answer wrong")
        new_lines = [f"#### {final}" if line.startswith("####") else line for line in new_lines]
        pairs.append(dict(prompt=ex["prompt"], chosen=ex["response"],
                          rejected="\n".join(new_lines)))
    return pairs

# -----------------------------------------------------------------------------
# tasks

def load_task(name, split="train", n=None, seed=0, **knobs):
    """Examples of a task: "arith" (knobs: see generate_arith), "gsm8k" (openai/gsm8k, config main),
    "math" / "math500" (MATH_TASKS), or a local file / folder / hub id with question and answer
    columns, or MATH's (knobs: config, the hub dataset's config). For tables, n takes the first n
    rows of the split and seed is unused; GSM8K's calculator annotations (<<48/2=24>>) are
    stripped from the solutions.

    A single local file holds both splits: a question is a test question when a hash of its text
    says so (about 1 in 10, the rule of the arith task), so train and test are disjoint whatever
    the row order. For a split of your own, pass a folder with train.jsonl and test.jsonl (or
    .json / .parquet / .csv). A repeated question is kept once (and said so); the same question
    with two answers is refused in a local file, naming both rows (a hub dataset keeps the first
    and names both)."""
    if name == "arith":
        return generate_arith(split, n, seed, **knobs)
    config = knobs.pop("config", None)
    if knobs:
        raise ValueError(f"task {name!r}: unknown option(s) {', '.join(knobs)} (expected config)")
    if name == "gsm8k":
        name, config = "openai/gsm8k", config or "main"
    if name in MATH_TASKS:
        rows, columns, where = _hub_math(name, split)
    else:
        rows, columns, where = load_table(name, split, config)
    math = "problem" in columns  # MATH's columns (problem, solution, ...), else GSM8K's
    if math:
        require_columns(columns, ["problem", "solution"], where,
                        optional=["answer", "subject", "type", "level"])
    else:
        require_columns(columns, ["question", "answer"], where)
    single_file = os.path.isfile(os.path.expanduser(str(name)))
    local = os.path.exists(os.path.expanduser(str(name)))
    out, first, repeated = [], {}, 0  # first: a question -> (its first row, that row's answer)
    for i, row in enumerate(rows):
        example = _math_example(row, where, i) if math else _gsm8k_example(row, where, i)
        question = example["question"]
        if single_file and (split == "test") != _is_test_question(question):
            continue
        if question in first:
            # decision: a repeated question is one question (scored once, trained on once);
            # with another answer, the file contradicts itself
            j, kept = first[question]
            answer = example["answer"]
            same = answer == kept or (
                math and is_correct(f"\\boxed{{{answer}}}", kept, "math"))
            clash = (f"{where} rows {j} and {i}: the same question with two answers "
                     f"({kept!r} and {answer!r})")
            # decision: a file of yours is refused (you can keep the right answer); a hub
            # dataset, which you cannot edit, keeps the first answer and says which rows
            if not same and local:
                raise ValueError(f"{clash}; keep the right one")
            if not same:
                print(f"{clash}: row {j}'s is kept")
            repeated += 1
            continue
        first[question] = (i, example["answer"])
        out.append(example)
    if repeated:
        print(f"{where}: {repeated} repeated question(s), each kept once")
    return out[:n]

def _gsm8k_example(row, where, i):
    question, answer = text_field(row, "question", where, i).strip(), text_field(row, "answer", where, i)
    gold, fallback = extract_answer_ex(answer)
    if gold is None or fallback:
        raise ValueError(f"{where} row {i}: "
                         f"field 'answer' has no '#### <number>' final answer line")
    # the calculator annotations are tool calls, not text a model should learn to write
    solution = CALC_RE.sub("", answer)
    return _example(question, solution.strip(), gold)

def load_split(cfg, split, tok=None):
    """The questions of a run's split, from its task settings (a train.py Config, an eval.py
    EvalConfig or a run's config.json): the one place where settings become a test set, so that
    every script that scores a run scores the same questions. With a chat tokenizer (uses_chat),
    the prompts are rendered through its chat template (chat_example)."""
    knobs = {}
    if cfg.task == "arith":
        steps = (cfg.arith_steps, max(cfg.arith_steps, cfg.arith_max_steps))  # (min, max)
        knobs = dict(steps=steps, max_number=cfg.arith_max_number, ops=cfg.arith_ops)
    n = cfg.n_train if split == "train" else cfg.n_test
    examples = load_task(cfg.task, split, n=n or None, seed=cfg.task_seed, **knobs)
    if tok is not None and uses_chat(tok):
        examples = [chat_example(ex, tok) for ex in examples]
    return examples

# -----------------------------------------------------------------------------
# preference pairs

ROLES = {"system": "System", "user": "Human", "assistant": "Assistant"}
ASSISTANT = "\n\nAssistant:"

def split_shared_prefix(chosen, rejected):
    """HH-RLHF rows hold the whole conversation in both fields: the prompt is the longest shared
    prefix, cut back to just after the last "\n\nAssistant:" inside it when there is one (so the
    responses start at a word, with their leading space). -> (prompt, chosen, rejected)."""
    k = len(os.path.commonprefix([chosen, rejected]))
    at = chosen.rfind(ASSISTANT, 0, k)
    cut = at + len(ASSISTANT) if at != -1 else k
    if cut == 0:
        raise ValueError("chosen and rejected share no prefix, so there is no prompt to split off")
    if cut == len(chosen) or cut == len(rejected):
        raise ValueError("one of chosen/rejected is a prefix of the other: "
                         "no response left after the prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]

def _check_messages(messages, field):
    """A list of chat messages {role: system|user|assistant, content: str}, or a ValueError."""
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in ROLES
                and isinstance(m.get("content"), str)):
            raise ValueError(f"field '{field}' holds a message that is not "
                             f"{{role: system|user|assistant, content: str}}: {str(m)[:80]}")
    return messages

def _messages_from_row(chosen, rejected, prompt, has_prompt):
    """TRL's conversational format: prompt, chosen, rejected as lists of messages; the responses
    are the assistant's turns after the prompt's last user turn. Without a prompt column, the
    prompt is the conversation up to its last user turn, which chosen and rejected must share.
    decision: not TRL's extract_prompt (the messages both start with), which made the two
    questions of a pair sharing only its system turn the "responses".
    -> dict(prompt, chosen, rejected) of message lists (render_pairs)."""
    fields = (("chosen", chosen), ("rejected", rejected)) + ((("prompt", prompt),) * has_prompt)
    for field, v in fields:
        if not isinstance(v, list):
            raise ValueError(f"field '{field}' is {a_kind(v)}, "
                             f"expected a list of messages like the others")
        _check_messages(v, field)
    if not has_prompt:
        last_user = [max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
                     for messages in (chosen, rejected)]
        cut = max(last_user) + 1
        if cut == 0:
            raise ValueError("no user turn in chosen or rejected, so there is no prompt to split "
                             "off")
        if chosen[:cut] != rejected[:cut]:
            k = next(k for k in range(cut) if k >= min(len(chosen), len(rejected))
                     or chosen[k] != rejected[k])
            role = (chosen if k < len(chosen) else rejected)[k]["role"]
            raise ValueError(f"chosen and rejected differ before their last assistant turn "
                             f"(message {k}, the {role}'s): expected one conversation up to its "
                             f"last user turn, then two replies")
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        user = next((k for k, m in enumerate(messages) if m["role"] == "user"), None)
        if user is not None:
            raise ValueError(f"field '{field}' holds a user turn (message {user}): a response is "
                             f"the assistant's reply to the prompt's last user turn")
    if not chosen or not rejected:
        raise ValueError("one of chosen/rejected holds no message after the prompt")
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return dict(prompt=prompt, chosen=chosen, rejected=rejected)

def _pair_from_row(row, has_prompt):
    """One table row -> dict(prompt, chosen, rejected);
    a ValueError (without the row) if it is bad."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    prompt = row.get("prompt") if has_prompt else None
    if isinstance(chosen, list) or isinstance(rejected, list):  # chat messages: render_pairs
        return _messages_from_row(chosen, rejected, prompt, has_prompt)
    for field, v in ((("chosen", chosen), ("rejected", rejected))
                     + ((("prompt", prompt),) if has_prompt else ())):
        problem = bad_text(v)
        if problem:
            raise ValueError(f"field '{field}' {problem} (expected a non-empty string)")
    if not has_prompt:
        prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
    if chosen == rejected:
        raise ValueError("chosen and rejected are identical")
    return dict(prompt=prompt, chosen=chosen, rejected=rejected)

def _hh_text(messages):
    return "".join(f"\n\n{ROLES[m['role']]}: {m['content']}" for m in messages)

def render_chat_pair(pair, tok):
    """One pair of message lists as text. With a chat template, as TRL's maybe_apply_chat_template
    renders it: the prompt up to the assistant's turn (the template's generation prompt), and
    each response what the whole conversation adds after it, cut at the end-of-turn token that
    closes the reply (tok.eot_token: every response gets it back as its EOS). Without one, the
    HH-RLHF rule: every message as "\n\nHuman: ...", "\n\nAssistant: ..." (or "System"), the
    prompt ending in "\n\nAssistant:", each response starting with the space after it."""
    if not uses_chat(tok):
        head = _hh_text(pair["prompt"])
        return dict(zip(("prompt", "chosen", "rejected"), split_shared_prefix(
            head + _hh_text(pair["chosen"]), head + _hh_text(pair["rejected"]))))
    prompt = tok.render_chat(pair["prompt"])
    end = tok.decode([tok.eot_token])  # e.g. <|im_end|>
    out = dict(pair, prompt=prompt)
    for field in ("chosen", "rejected"):
        whole = tok.render_chat(pair["prompt"] + pair[field], add_generation_prompt=False)
        if not whole.startswith(prompt):
            raise ValueError(f"the chat template renders the prompt's messages otherwise inside "
                             f"the whole conversation (field '{field}'): no response to cut off")
        reply = whole[len(prompt):]
        out[field] = reply[:reply.rfind(end)] if end in reply else reply
    if not out["chosen"].strip() or not out["rejected"].strip():
        raise ValueError("the chat template renders an empty chosen or rejected response")
    return out

def render_pairs(pairs, tok, verbose=True):
    """Pairs -> pairs of text: those in TRL's conversational format (message lists) rendered by
    render_chat_pair with the model's tokenizer `tok` (None: no chat template), the others as
    they are. decision: rendered once, where pairs are read for a model (the pairs stage, with
    the SFT checkpoint's tokenizer; eval.py --pairs, with the scored model's), so that training
    sees the prompts evaluation asks."""
    chat = [i for i, p in enumerate(pairs) if isinstance(p["chosen"], list)]
    out = list(pairs)
    for i in chat:
        try:
            out[i] = render_chat_pair(pairs[i], tok)
        except ValueError as e:
            raise ValueError(f"pair {i}: {e}") from None
    if chat and verbose:
        how = (f"through the chat template of {tok.name}" if uses_chat(tok) else
               "as '\\n\\nHuman: ...\\n\\nAssistant: ...' text (the model has no chat "
               "template: HH-RLHF's format)")
        print(f"pairs: {len(chat)} of {len(pairs)} pairs are chat messages, rendered {how}")
    return out

def load_pairs(source, split="train"):
    """Preference pairs -> list of dict(prompt, chosen, rejected).
    source: a local .jsonl/.json/.parquet/.csv file, a folder with {split}.<ext>, or a hub id.
    Columns: chosen and rejected, plus prompt unless they hold the whole conversation (HH-RLHF).
    A bad row is an error naming the file, the row and the field: never silently dropped."""
    rows, columns, where = load_table(source, split)
    require_columns(columns, ["chosen", "rejected"], where, optional=["prompt"])
    pairs = []
    for i, row in enumerate(rows):
        try:
            pairs.append(_pair_from_row(row, "prompt" in columns))
        except ValueError as e:
            raise ValueError(f"{where} row {i}: {e}") from None
    return pairs

def _most_frequent(samples, kind="gsm8k"):
    """The first sample whose extracted answer is the most frequent one among the samples."""
    answers = [extract_answer(s, kind) for s in samples]
    return samples[answers.index(Counter(answers).most_common(1)[0][0])]

def pairs_from_samples(records):
    """On-policy pairs, cDPO's recipe: records of dict(prompt, answer, samples, finished) ->
    (pairs, stats). Per question, chosen = a sample with the most frequent correct answer,
    rejected = one with the most frequent wrong answer; a question without a correct or without a
    wrong sample gives no pair, and stats count why, and the prompts that were cut to fit the
    context (records' `prompt_cut`). A sample that is empty (nothing to score) or that did not
    end (cut at --max_new_tokens: `finished` false) is neither: graded by the last number it
    reached, and trained on with an EOS after it, it would teach an answer the model never gave;
    stats count them."""
    pairs, counts = [], Counter()
    for r in records:
        ended = r.get("finished", [True] * len(r["samples"]))  # (sample files of older runs)
        usable = [s for s, f in zip(r["samples"], ended) if f and s.strip()]
        kind = grader(r)
        right = [s for s in usable if is_correct(s, r["answer"], kind)]
        wrong = [s for s in usable if s not in right]
        counts.update(samples=len(r["samples"]), unfinished=ended.count(False),
                      empty=sum(f and not s.strip() for s, f in zip(r["samples"], ended)),
                      right=len(right), no_right=not right, no_wrong=bool(right) and not wrong,
                      prompts_cut=r.get("prompt_cut", False))
        if right and wrong:
            pairs.append(dict(prompt=r["prompt"], chosen=_most_frequent(right, kind),
                              rejected=_most_frequent(wrong, kind), answer=r["answer"]))
    stats = dict(questions=len(records), samples=counts["samples"],
                 sample_accuracy=counts["right"] / max(1, counts["samples"]),
                 skipped_no_correct=counts["no_right"], skipped_no_wrong=counts["no_wrong"],
                 empty_samples=counts["empty"], unfinished_samples=counts["unfinished"],
                 prompts_cut=counts["prompts_cut"])
    return pairs, stats

def split_pairs(pairs, val_frac, seed=0):
    """-> (train, held out, stats). Exact duplicates are kept once (and counted); then pairs are
    held out by prompt, so that no held-out prompt (and no held-out pair) is also trained on: the
    prompts are shuffled with `seed` and taken until val_frac of the pairs are held out."""
    unique = list({(p["prompt"], p["chosen"], p["rejected"]): p for p in pairs}.values())
    prompts = list(dict.fromkeys(p["prompt"] for p in unique))
    random.Random(seed).shuffle(prompts)
    count = Counter(p["prompt"] for p in unique)
    held, n_held = set(), 0
    for prompt in prompts:
        if n_held >= round(val_frac * len(unique)):
            break
        held.add(prompt)
        n_held += count[prompt]
    train = [p for p in unique if p["prompt"] not in held]
    val = [p for p in unique if p["prompt"] in held]
    random.Random(seed).shuffle(train)
    stats = dict(pairs=len(pairs), duplicates_removed=len(pairs) - len(unique),
                 train_pairs=len(train), val_pairs=len(val))
    return train, val, stats

# -----------------------------------------------------------------------------
# tokenization and truncation
#
# Prompt and response are tokenised SEPARATELY and the ids concatenated: BPE could otherwise merge
# across the boundary and shift the loss mask by a token. The response gets EOS appended so that
# the model learns to stop. Truncation rule (the original DPO code's): only a row longer than
# max_len is cut. First its prompt is cut to max_prompt_len tokens keeping the END (the question is
# usually last); then, if still too long, the response(s) are cut to fit max_len (a cut response
# loses its EOS: it does not end there). A row left with no response token is dropped. Everything
# is counted in the returned stats (and printed when verbose).

def _encode_rows(items, tok, max_len, max_prompt_len, fields, what, verbose):
    max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
    if not 1 <= max_prompt_len <= max_len:
        raise ValueError(f"max_prompt_len must be in [1, max_len={max_len}], got {max_prompt_len}")
    stats = dict(rows=len(items), kept=0, truncated=0, prompt_truncated=0, response_truncated=0,
                 dropped=0)
    rows = []
    for i, item in enumerate(items):
        prompt = encode_prompt(tok, text_field(item, "prompt", what, i))
        resps = [encode_response(tok, text_field(item, f, what, i)) + [tok.eot_token] for f in fields]
        longest = max(range(len(fields)), key=lambda k: len(resps[k]))
        if len(prompt) + len(resps[longest]) > max_len:
            cut_prompt = len(prompt) > max_prompt_len
            if cut_prompt:
                prompt = prompt[-max_prompt_len:]
            room = max_len - len(prompt)
            cut_resp = max(map(len, resps)) > room
            resps = [r[:room] for r in resps]
            # nothing left to score (and 0/0 in length-normalised losses)
            if min(map(len, resps)) == 0:
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            stats["prompt_truncated"] += cut_prompt
            stats["response_truncated"] += cut_resp
        stats["kept"] += 1
        rows.append(dict(idx=i, prompt_ids=prompt,
                         **{f"{f}_ids": r for f, r in zip(fields, resps)}))
    if verbose and (stats["truncated"] or stats["dropped"]):
        print(f"warning: {what}: {stats['truncated']} of {stats['rows']} rows truncated "
              f"to max_len={max_len} ({stats['prompt_truncated']} prompts cut keeping their end, "
              f"{stats['response_truncated']} responses cut), {stats['dropped']} rows dropped")
    return rows, stats

def encode_sft(examples, tok, max_len, max_prompt_len=None, verbose=True):
    """examples (prompt, response) -> (rows of dict(idx, prompt_ids, response_ids incl. EOS),
    stats). max_prompt_len defaults to max_len // 2; see the truncation rule above."""
    return _encode_rows(examples, tok, max_len, max_prompt_len, ["response"], "sft data",
                        verbose)

def encode_pairs(pairs, tok, max_len, max_prompt_len=None, verbose=True):
    """pairs (prompt, chosen, rejected) -> (rows of dict(idx, prompt_ids, chosen_ids, rejected_ids),
    stats). Both responses incl. EOS; max_prompt_len defaults to max_len // 2."""
    return _encode_rows(pairs, tok, max_len, max_prompt_len, ["chosen", "rejected"], "pairs",
                        verbose)

def row_lengths(rows):
    """Tokens in each row's longest sequence (prompt + longest response),
    for length_grouped_batches."""
    return [len(r["prompt_ids"])
            + max(len(v) for k, v in r.items() if k.endswith("_ids") and k != "prompt_ids")
            for r in rows]

# -----------------------------------------------------------------------------
# batches

def _collate(seqs, pad_id, pad_to, max_len):
    """seqs: list of (prompt_ids, response_ids) ->
    dict(input_ids, targets, loss_mask), each (B, T)."""
    if not seqs:
        raise ValueError("cannot make a batch from 0 rows")
    T = max(len(p) + len(r) for p, r in seqs)
    if pad_to:  # round T up to a few sizes so torch.compile does not recompile for every new length
        T_round = -(-T // pad_to) * pad_to
        T = max(T, min(T_round, max_len)) if max_len else T_round
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (p, r) in enumerate(seqs):
        input_ids[b, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        # targets[t] = input_ids[t+1], so the response tokens at columns len(p) .. len(p)+len(r)-1
        # are the targets of columns len(p)-1 .. len(p)+len(r)-2
        loss_mask[b, len(p) - 1:len(p) + len(r) - 1] = True
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]          # the one and only shift
    return dict(input_ids=input_ids, targets=targets, loss_mask=loss_mask)

def sft_batch(rows, pad_id, pad_to=None, max_len=None):
    """rows from encode_sft -> dict(input_ids, targets, loss_mask), (B, T). pad_to rounds T up to a
    multiple (capped at max_len when given); pad_id is the EOS id by our convention."""
    return _collate([(r["prompt_ids"], r["response_ids"]) for r in rows], pad_id, pad_to, max_len)

def preference_batch(rows, pad_id, eos_pad=False, pad_to=None, max_len=None):
    """rows from encode_pairs -> dict(input_ids, targets, loss_mask), (2B, T): rows [0:B] are
    prompt+chosen, rows [B:2B] prompt+rejected, pair i = rows i and B+i. eos_pad=True appends EOS
    tokens (scored, i.e. masked in) to the shorter response of each pair so both have the same
    length, as the static ADPO family needs. It never exceeds max_len: the longer response
    already fits after the same prompt. (The pad id is the EOS id.)"""
    chosen, rejected = [], []
    for r in rows:
        c, j = r["chosen_ids"], r["rejected_ids"]
        if eos_pad:
            L = max(len(c), len(j))
            c, j = c + [pad_id] * (L - len(c)), j + [pad_id] * (L - len(j))
        chosen.append((r["prompt_ids"], c))
        rejected.append((r["prompt_ids"], j))
    return _collate(chosen + rejected, pad_id, pad_to, max_len)

def length_grouped_batches(lengths, batch_size, seed=0):
    """Batches of indices with similar lengths (less padding), like HF's group_by_length: shuffle,
    split into mega-chunks of 50 * batch_size, sort each chunk by length (longest first), cut into
    batches, shuffle the batches. Deterministic in seed; every index exactly once (the last batch
    may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    mega = 50 * batch_size
    batches = []
    for start in range(0, len(idx), mega):
        chunk = sorted(idx[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
