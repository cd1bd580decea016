"""lvlm_jax: self-improvement fine-tuning of LLaVA-style vision-language models in JAX."""

from lvlm_jax.errors import UserError

__all__ = ["UserError"]
