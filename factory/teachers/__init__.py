"""Teacher backends. `make_teacher` imports only the backend a recipe asks for."""
from __future__ import annotations

from typing import TYPE_CHECKING

from apprentice.errors import TeacherError
from apprentice.responses import Choice, TeacherResponse

from .base import Teacher

if TYPE_CHECKING:
    from ..recipe import TeacherConfig

__all__ = ["Choice", "Teacher", "TeacherError", "TeacherResponse", "make_teacher"]


def make_teacher(config: "TeacherConfig", rate_share: float = 1.0) -> Teacher:
    """The backend `config` names. `rate_share`: this process's part of the provider's rate limits (the Ray
    runner's workers); a fleet's endpoints limit themselves with it, one server's limiter is the run's."""
    if config.provider == "openai" and isinstance(config.base_url, list):
        from .fleet import FleetTeacher

        return FleetTeacher(config, rate_share)
    if config.provider == "openai":
        from .openai import OpenAITeacher

        return OpenAITeacher(config)
    if config.provider == "anthropic":
        from .anthropic import AnthropicTeacher

        return AnthropicTeacher(config)
    if config.provider == "local":
        from .local import LocalTeacher

        return LocalTeacher(config)
    if config.provider == "vllm":
        from .vllm import VLLMTeacher

        return VLLMTeacher(config)
    raise ValueError(f"unknown teacher provider {config.provider!r}")
