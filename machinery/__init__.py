"""
The machinery behind the five paper files (model.py, loss.py, data.py, train.py, eval.py): what a
real run needs and a reader of the paper never has to open to follow the algorithm.

    common.py      flags and presets, device/precision/DDP setup, seeds, atomic files, run folders
    config.py      train.py's Config: every flag, its checks, the terms of --loss
    compare.py     the comparison harness (--compare): variants, labels, folders, Table 3's order
    report.py      a run's report, read back from its folders: summary.json, tables, plots
    checkpoint.py  our ckpt.pt files; load_model for a checkpoint, an HF folder, a hub id, GPT-2
    hf.py          Hugging Face in and out: hub, config.json mapping, weight names, export
    tokenizer.py   byte, GPT-2 (tiktoken) and tokenizer.json tokenizers, chat templates
    tables.py      local files and hub datasets, read with one-line errors
    lora.py        LoRA adapters (PEFT-exact)
    parallel.py    FSDP2: place a model on its device or shard it over the ranks
    plan.py        the memory plan (--plan): a run's step traced on fake tensors
    tracking.py    --report_to: TensorBoard, W&B, Trackio

Imports go one way: the paper files import from here; in here, a module imports only the ones
listed above it or model.py and loss.py, never data.py, train.py or eval.py (report.py reads
eval.py's statistics).
"""
