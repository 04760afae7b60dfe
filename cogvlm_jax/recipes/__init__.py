"""Scripts that make shipped artefacts (``python -m cogvlm_jax.recipes.NAME --help``)."""
