"""Apprentice eval stage (see ARCHITECTURE.md); not built yet."""
