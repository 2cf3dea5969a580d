"""Apprentice sft stage: fine-tune a student (TRL + peft LoRA/QLoRA) on factory runs.

`python -m sft train RECIPE.yaml`; see `sft.config` for the `sft:` recipe section, `sft.data` for how runs
become train/eval datasets, `sft.train` for the trainer and what it writes.
"""
