"""``python -m prinmix_jax.cli``: the ``prinmix`` command."""
from prinmix_jax.cli import main

if __name__ == "__main__":
    main()
