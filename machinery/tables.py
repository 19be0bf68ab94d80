"""
Reading tables: a local .jsonl / .json / .parquet / .csv file, a folder holding {split}.<ext>, or
a hub dataset, with one-line errors that name the file, the line or row and the field (never
datasets' own traceback, never a silently mixed-up column). JSON is read by Python's json, JSON
Lines by common.read_jsonl (as a run reads the files it writes), the rest through `datasets`.

    rows, columns, where = load_table("data/gsm8k.jsonl")   # where: what messages call it
    require_columns(columns, ["question", "answer"], where)
    text_field(row, "question", where, i)                    # a non-empty string, or one line

data.py builds its tasks and preference pairs on these.
"""
import codecs
import csv
import difflib
import json
import os
import re

from machinery.common import DuplicateKey, json_row_problem, read_jsonl, unique_keys

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

def a_kind(v):
    kind = type(v).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"   # "an int", "a list"

def _one_line(e):
    """The outer and the innermost error of a chain, on one line: datasets wraps the real problem
    (ArrowInvalid, UnicodeDecodeError...) a few levels deep under a generic message."""
    def line(x):
        msg = str(x).strip().split("\n")[0][:150]
        return f"{type(x).__name__}: {msg}" if msg else type(x).__name__
    inner = e
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__
    return line(e) if inner is e else f"{line(e)} <- {line(inner)}"

def _check_utf8(path):
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not valid UTF-8 "
                                 f"(bad byte near offset {offset + e.start})") from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8 (truncated character at the end)") from None

def _read_json(path):
    """The rows of a .json file: a list of objects, one object (one row), or JSON Lines (datasets
    reads all three)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        value = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise ValueError(f"{path}: could not read it as json ({e})") from None
    except json.JSONDecodeError as e:
        first = next((line for line in text.split("\n") if line.strip()), "")
        try:
            json.loads(first)  # the first line stands alone: JSON Lines in a .json file
        except json.JSONDecodeError:
            raise ValueError(f"{path}: could not read it as json (line {e.lineno} column "
                             f"{e.colno}: {e.msg})") from None
        return read_jsonl(path)
    rows = value if isinstance(value, list) else [value]
    for i, row in enumerate(rows):
        problem = json_row_problem(row, "row")
        if problem:
            raise ValueError(f"{path}: could not read it as json (row {i}: {problem})")
    return rows

def _parquet_rows(path):
    """The row count a Parquet file's footer records (None where it has no readable footer:
    datasets' reader then names what is wrong)."""
    import pyarrow.parquet as pq  # (datasets' own dependency)
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None

def _split_file(folder, split):
    """The file of a split in a folder: {split}.jsonl, .json, .parquet or .csv (the first found)."""
    found = [p for p in (os.path.join(folder, split + ext) for ext in BUILDERS)
             if os.path.isfile(p)]
    return found[0] if found else None

def local_files(source, splits=("train", "test")):
    """The local files a task or a pair source reads (what pins a run to them): the file itself,
    or a folder's split files; none for the embedded and hub tasks or a hub dataset."""
    path = os.path.expanduser(str(source))
    if source in ("arith", "gsm8k") or not os.path.exists(path):
        return []
    if os.path.isfile(path):
        return [path]
    return [f for f in (_split_file(path, split) for split in splits) if f]

def load_table(source, split="train", config=None):
    """-> (rows as a list of dicts, column names, name for error messages).
    `source` is a local file, a folder holding {split}.jsonl/.json/.parquet/.csv,
    or a hub dataset id (with `config`)."""
    import datasets  # imported here: it is slow to import and the offline arith task never needs it
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        found = _split_file(path, split)
        if not found:
            raise FileNotFoundError(f"{source}: no {split}.jsonl/.json/.parquet/.csv "
                                    f"in this folder")
        path = found
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise ValueError(f"{path}: unsupported file type '{ext}' "
                             f"(expected one of {', '.join(BUILDERS)})")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path}: file is empty")
        if ext != ".parquet":
            _check_utf8(path)                   # a clearer message than the one datasets gives
        elif _parquet_rows(path) == 0:          # (datasets: "BatchSize must be greater than 0")
            raise ValueError(f"{path}: no rows in it")
        if ext in (".jsonl", ".json"):
            # Python's json, as the files a run writes are read: Arrow's reader, behind datasets,
            # refused what they can hold ("Trailing data at position 42") and json-decoded the
            # strings of a column that mixed strings and numbers (" 5" became the int 5)
            rows = read_jsonl(path) if ext == ".jsonl" else _read_json(path)
            if not rows:
                raise ValueError(f"{path}: no rows in it (blank lines or an empty list only)")
            return rows, list(dict.fromkeys(key for row in rows for key in row)), path
        kwargs = {}
        if ext == ".csv":  # CSV cells are text: keep them strings (pandas would make "5" the int 5)
            with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's CSV has a BOM
                reader = csv.reader(f)
                header = next(reader, [])
                if not any(reader):  # (datasets: 'Instruction "train" corresponds to no data!')
                    raise ValueError(f"{path}: no rows in it (a header only)")
            twice = [c for c in dict.fromkeys(header) if header.count(c) > 1]
            if twice:  # (pandas renames the second 'answer' 'answer.1': which one is meant?)
                raise ValueError(f"{path}: column {twice[0]!r} appears twice in the header "
                                 f"(expected each column once)")
            kwargs["features"] = datasets.Features({c: datasets.Value("string") for c in header})
            # and only an empty cell is missing: pandas would also read "N/A", "NA", "None", "null",
            # "nan"... as missing, which an answer or a response can be
            kwargs.update(keep_default_na=False, na_values=[""])
        quiet = datasets.are_progress_bars_disabled()
        # a local file loads in a blink; its bars would only clutter stderr
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(BUILDERS[ext], data_files=path, split="train", **kwargs)
        except Exception as e:
            raise ValueError(f"{path}: could not read it as {ext[1:]} ({_one_line(e)})") from None
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        where = path
    elif os.path.splitext(path)[1].lower() in BUILDERS or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: no such file")
    else:
        try:
            ds = datasets.load_dataset(source, config, split=split)
        except Exception as e:
            raise ValueError(f"could not load {source!r} (config {config!r}, split {split!r}) "
                             f"from the Hugging Face hub ({_one_line(e)}); "
                             f"offline, pass a local .jsonl/.json/.parquet/.csv file") from None
        where = f"{source}[{split}]"
    return ds.to_list(), list(ds.column_names), where

def require_columns(columns, needed, where, optional=()):
    """Columns are matched exactly: a near miss of a column the reader uses ('Prompt', 'chosen ',
    'promt') is an error naming both, never silently a missing column (a pair file without
    `prompt` is read another way: HH-RLHF; a MATH file without `answer` takes the solution's box).
    decision: the file's other columns are ignored, as its ids, scores and metadata are
    (UltraFeedback's score_chosen, MATH-500's unique_id)."""
    for name in (*needed, *optional):
        near = [c for c in columns if c != name and _near_miss(c, name)]
        if name not in columns and near:
            raise ValueError(f"{where}: column {near[0]!r} is not {name!r} (columns are matched "
                             f"exactly: rename it to {name!r})")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(map(repr, missing))} "
                         f"(found: {', '.join(map(repr, columns)) or 'none'})")

def _near_miss(column, name):
    """Whether a column's name looks like a misspelling of `name`: the same but for case, spaces,
    '_' or '-', or close to it by difflib's ratio ('promt', 'anwser': 0.8 and over, stricter than
    the flags' 0.6, since a table holds columns of its own, such as 'label' beside 'level'),
    unless it names a column of its own after it ('prompt_id', 'score_chosen')."""
    if re.sub(r"[\s_-]", "", column).lower() == name:
        return True
    words = re.split(r"[\W_]+", column.lower())
    return name not in words and difflib.SequenceMatcher(None, column.lower(), name).ratio() >= 0.8

def bad_text(v):
    """What is wrong with a field that should be a non-empty string, or None if nothing is."""
    if v is None:
        return "is missing"
    if not isinstance(v, str):
        return f"is {a_kind(v)}"
    return None if v.strip() else "is empty"

def text_field(row, field, where, i):
    """A non-empty string field of a row, or a ValueError naming where, row and field."""
    problem = bad_text(row.get(field))
    if problem:
        raise ValueError(f"{where} row {i}: field '{field}' {problem} "
                         f"(expected a non-empty string)")
    return row[field]

