"""cogvlm-jax: CogVLM and CogVLM2 in JAX/Flax."""

from cogvlm_jax.config import CogVLMConfig, ConfigError, load_config, preset

__all__ = ["CogVLMConfig", "ConfigError", "load_config", "preset"]
