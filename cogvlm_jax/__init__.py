"""cogvlm-jax: CogVLM and CogVLM2 in JAX/Flax.

    import cogvlm_jax
    model = cogvlm_jax.load("path/to/cogvlm2-llama3-chat-19B", dtype="bfloat16")
    print(model.chat("cat.png", "What is in the picture?"))
"""

from cogvlm_jax.api import InputError, Model, load
from cogvlm_jax.config import CogVLMConfig, ConfigError, load_config, preset
from cogvlm_jax.parallel.axes import make_mesh

__all__ = ["CogVLMConfig", "ConfigError", "InputError", "Model", "load", "load_config", "make_mesh", "preset"]
