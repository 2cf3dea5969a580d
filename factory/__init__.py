"""Apprentice data factory: prompts → teacher → quality checks → accepted/rejected JSONL."""

__version__ = "0.1.0"
