"""Apprentice's shared vocabulary: the leaf every layer may import and that imports none of them.

    errors     one base error with declared fields; TeacherError; FATAL_STATUS
    responses  a teacher's answer (Choice, TeacherResponse) and the retry-after parser
    tokens     TokenLogprobs and its JSON codec
    text       the text normalisers and ROUGE-L
    hashing    stable hashes and canonical JSON (ids and cache keys are hashes of what was asked)
    config     the strict pydantic base, `--set` overrides, the recipe loader, error formatting

See docs/ARCHITECTURE.md for the layers above it.
"""

__version__ = "0.1.0"
