"""Apprentice sft stage (see ARCHITECTURE.md); not built yet."""
