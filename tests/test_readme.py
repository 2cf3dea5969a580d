"""The docs' YAML is what the code accepts: every ```yaml block of the README and of docs/*.md validates
against the recipe models.

A block with a `factory:` key (or the keys of one: `teacher:`, `checks:`, `best_of:`, …) validates as the
factory section, with a prompt file filled in where the block leaves the source out; `sft:` validates as
the sft section, with a run directory filled in where it names none; `eval:` as the eval section; `serve:` as
the serve section. A snippet the models reject (a renamed key, a placeholder) fails here, not in a user's run.
"""
from __future__ import annotations

import re

import pytest
import yaml
from helpers import REPO

README = REPO / "README.md"
FACTORY_KEYS = {"output_dir", "prompts", "samples_per_prompt", "teacher", "checks", "best_of", "budget_usd"}


def yaml_blocks() -> list[tuple[str, str]]:
    """(file:line, block) of every ```yaml block in the README and the docs pages."""
    blocks = []
    for page in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(REPO).as_posix()
        blocks += [(f"{name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
                   for m in re.finditer(r"```yaml\n(.*?)```", text, re.S)]
    return blocks


def test_the_reference_pages_have_yaml_blocks():
    """The reference lives in docs/ (the README is the front door); each page with recipe keys shows them."""
    for page in ("generate", "checks", "training", "eval", "use-your-student"):
        assert any(where.startswith(f"docs/{page}.md") for where, _ in yaml_blocks()), f"docs/{page}.md"
    assert sum(where.startswith("docs/") for where, _ in yaml_blocks()) >= 10


def test_the_readme_is_a_front_door():
    """Quickstart first, short, the six steps, a glossary; every page it links exists, and every docs page is linked."""
    text = README.read_text(encoding="utf-8")
    words = len(re.sub(r"```.*?```", " ", text, flags=re.S).split())
    assert words <= 1500, f"README.md has {words} words of prose: move reference into docs/"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "Quickstart" and "Your own task in six steps" in headings and "Glossary" in headings
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "git clone" in quickstart and "make demo" in quickstart and "make test" in quickstart
    assert "Python 3.10" in quickstart and "TORCH_INDEX_URL" in quickstart
    steps = text.split("## Your own task in six steps", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^\d\. ", steps, re.M)) == 6
    for command in ("--dry-run", "--limit 20", "apprentice review", "apprentice train", "apprentice eval", "hf auth login"):
        assert command in steps, command
    linked = set(re.findall(r"\]\((docs/[^)#]+)", text))
    for target in linked | set(re.findall(r"\]\(([A-Z]+)\)", text)):
        assert (REPO / target).exists(), f"README.md links {target}, which does not exist"
    pages = {f"docs/{path.name}" for path in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_links_between_the_docs_pages_resolve():
    for page in (REPO / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).resolve().exists(), f"{page.name} links {target}, which does not exist"


@pytest.mark.parametrize("line,block", yaml_blocks(), ids=[where for where, _ in yaml_blocks()])
def test_every_yaml_block_in_the_docs_validates(line, block):
    from apprentice.config import validate_section
    from eval.config import EvalConfig
    from factory.recipe import FactoryConfig
    from serve.config import ServeConfig
    from sft.config import validate_sft_section

    data = yaml.safe_load(block)
    assert isinstance(data, dict), f"{line}: not a mapping"
    factory = data.pop("factory", None)
    if factory is None and set(data) <= FACTORY_KEYS:
        factory, data = data, {}
    sft = data.pop("sft", None)
    evaluation = data.pop("eval", None)
    serving = data.pop("serve", None)
    assert not data, f"{line}: keys of no section: {sorted(data)}"
    assert factory is not None or sft is not None or evaluation is not None or serving is not None
    if serving is not None:
        validate_section(ServeConfig, "serve", serving, line)
    if evaluation is not None:
        validate_section(EvalConfig, "eval", evaluation, line)
    if factory is not None:
        factory = dict(factory)
        factory.setdefault("prompts", {"path": "data/seeds/demo.jsonl"})
        FactoryConfig.model_validate(factory)
    if sft is not None:
        validate_sft_section({"data": ["runs/demo"], **sft}, line)  # a fragment names no run


def test_the_accelerate_configs_the_readme_names_load_in_accelerate():
    """`accelerate launch --config_file configs/accelerate/NAME.yaml -m sft train …` (docs/training.md, linked from docs/scaling.md):
    accelerate's own loader reads every file (an unknown key or a bad value is an error there)."""
    from accelerate.commands.config.config_args import ClusterConfig

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    names = sorted(path.stem for path in (REPO / "configs" / "accelerate").glob("*.yaml"))
    assert names == ["ddp", "ddp-multinode", "deepspeed-zero3", "fsdp", "fsdp-multinode"]
    for name in names:
        assert f"configs/accelerate/{name}.yaml" in text, f"docs/training.md names {name}.yaml with its launch command"
    loaded = {name: ClusterConfig.from_yaml_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
              for name in names}
    assert loaded["ddp"].distributed_type.value == "MULTI_GPU"
    assert loaded["fsdp"].distributed_type.value == "FSDP" and loaded["fsdp"].fsdp_config
    assert loaded["ddp-multinode"].num_machines == 2 and loaded["ddp-multinode"].main_process_ip
    assert loaded["fsdp-multinode"].distributed_type.value == "FSDP" and loaded["fsdp-multinode"].num_machines == 2
    assert loaded["deepspeed-zero3"].distributed_type.value == "DEEPSPEED"
    assert loaded["deepspeed-zero3"].deepspeed_config["zero_stage"] == 3
