"""
The machinery behind the five paper files (model.py, loss.py, data.py, train.py, eval.py): what a
real run needs and a reader of the paper never has to open to follow the algorithm. In the order
they build on each other (a module imports only modules above it, and model.py or loss.py):

    common.py      flags and presets, device/precision/DDP setup, seeds, atomic files, run folders
    tables.py      local files and hub datasets, read with one-line errors
    lora.py        LoRA adapters (PEFT-exact)
    tracking.py    --report_to: TensorBoard, W&B, Trackio
    hf.py          Hugging Face in and out: the hub, config.json mapping, weight names, export
    tokenizer.py   byte, GPT-2 (tiktoken) and tokenizer.json tokenizers, chat templates
    parallel.py    FSDP2: place a model on its device or shard it over the ranks
    checkpoint.py  our ckpt.pt files; load_model for a checkpoint, an HF folder, a hub id, GPT-2
    plan.py        the memory plan (--plan): a run's step traced on fake tensors
    config.py      train.py's Config: every flag, its checks, --loss resolved into an Objective
    compare.py     the comparison harness: --compare variants, --pipeline_seeds, Table 3's order
    inputs.py      a run folder claimed by one config and pinned to its inputs' content
    report.py      a run's report, read back from its folders (eval.py's statistics)

data.py uses tables and tokenizer; eval.py and train.py the rest. Nothing here imports train.py or
data.py, and only report.py imports eval.py (tests/test_layout.py checks it).
"""
