"""The ``prinmix`` command line (click): one module per command, added to the group here.

* :mod:`~prinmix_jax.cli.group`: the group :data:`main`, exit statuses, the help epilog, error handling;
* :mod:`~prinmix_jax.cli.compress`, :mod:`~prinmix_jax.cli.apply`, :mod:`~prinmix_jax.cli.inspect`,
  :mod:`~prinmix_jax.cli.eval`, :mod:`~prinmix_jax.cli.demo`, :mod:`~prinmix_jax.cli.distill`: the subcommands;
* :mod:`~prinmix_jax.cli.options`: option types and parsers shared by several commands;
* :mod:`~prinmix_jax.cli.runtime`: JAX set-up before anything compiles (GPU autotuning, compilation cache).

A new command is a module with a ``@click.command()`` function, added below with ``main.add_command``.
"""
from __future__ import annotations

from prinmix_jax.cli import apply, compress, demo, distill, eval, generate, inspect, serve
from prinmix_jax.cli.group import EXIT_BROKEN_PIPE, EXIT_DEGENERATE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from prinmix_jax.cli.group import epilog, main
from prinmix_jax.cli.runtime import CUDA_PLUGINS, gpu_xla_flags

__all__ = ["CUDA_PLUGINS", "EXIT_BROKEN_PIPE", "EXIT_DEGENERATE", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK",
           "EXIT_USAGE", "epilog", "gpu_xla_flags", "main"]

main.add_command(compress.compress)
main.add_command(apply.apply)
main.add_command(distill.distill)
main.add_command(inspect.inspect)
main.add_command(eval.eval_cmd, "eval")
main.add_command(demo.demo)
main.add_command(serve.serve)
main.add_command(generate.generate)
