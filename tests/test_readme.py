"""The README's YAML is what the code accepts: every ```yaml block validates against the recipe models.

A block with a `factory:` key (or the keys of one: `teacher:`, `checks:`, `best_of:`, …) validates as the
factory section, with a prompt file filled in where the block leaves the source out; `sft:` validates as
the sft section, with a run directory filled in where it names none. A snippet the models reject (a renamed key, a placeholder) fails here, not in a user's run.
"""
from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

README = REPO / "README.md"
FACTORY_KEYS = {"output_dir", "prompts", "samples_per_prompt", "teacher", "checks", "best_of", "budget_usd"}


def yaml_blocks() -> list[tuple[int, str]]:
    text = README.read_text(encoding="utf-8")
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```yaml\n(.*?)```", text, re.S)]


def test_the_readme_has_yaml_blocks():
    assert len(yaml_blocks()) >= 6


@pytest.mark.parametrize("line,block", yaml_blocks(), ids=[f"README.md:{line}" for line, _ in yaml_blocks()])
def test_every_yaml_block_in_the_readme_validates(line, block):
    from factory.recipe import FactoryConfig
    from sft.config import validate_sft_section

    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"README.md:{line}: not a mapping"
    factory = data.pop("factory", None)
    if factory is None and set(data) <= FACTORY_KEYS:
        factory, data = data, {}
    sft = data.pop("sft", None)
    assert not data, f"README.md:{line}: keys of no section: {sorted(data)}"
    assert factory is not None or sft is not None
    if factory is not None:
        factory = dict(factory)
        factory.setdefault("prompts", {"path": "data/seeds/demo.jsonl"})
        FactoryConfig.model_validate(factory)
    if sft is not None:
        validate_sft_section({"data": ["runs/demo"], **sft}, f"README.md:{line}")  # a fragment names no run


def test_the_accelerate_configs_the_readme_names_load_in_accelerate():
    """`accelerate launch --config_file configs/accelerate/NAME.yaml -m sft train …` (README, Scaling out):
    accelerate's own loader reads every file (an unknown key or a bad value is an error there)."""
    from accelerate.commands.config.config_args import ClusterConfig

    text = README.read_text(encoding="utf-8")
    names = sorted(path.stem for path in (REPO / "configs" / "accelerate").glob("*.yaml"))
    assert names == ["ddp", "ddp-multinode", "deepspeed-zero3", "fsdp", "fsdp-multinode"]
    for name in names:
        assert f"configs/accelerate/{name}.yaml" in text, f"the README names {name}.yaml with its launch command"
    loaded = {name: ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
              for name in names}
    assert loaded["ddp"].distributed_type.value == "MULTI_GPU"
    assert loaded["fsdp"].distributed_type.value == "FSDP" and loaded["fsdp"].fsdp_config
    assert loaded["ddp-multinode"].num_machines == 2 and loaded["ddp-multinode"].main_process_ip
    assert loaded["fsdp-multinode"].distributed_type.value == "FSDP" and loaded["fsdp-multinode"].num_machines == 2
    assert loaded["deepspeed-zero3"].distributed_type.value == "DEEPSPEED"
    assert loaded["deepspeed-zero3"].deepspeed_config["zero_stage"] == 3
