"""prinmix-jax: PrinMix delta compression of fine-tuned LLMs in JAX/Flax."""
