"""Shared helpers of the CLI tests: run a command in-process, and read its one-line error."""
import os

from click.testing import CliRunner

from prinmix_jax.cli import main

#: The quickest compress: BitDelta, data-free, embeddings and head left out.
FAST = ["--data-free", "--method", "bitdelta", "--embeddings", "skip", "--lm-head", "skip", "--no-progress"]


def run(*args):
    """``prinmix ARGS`` through click's test runner (paths may be ``os.PathLike``)."""
    return CliRunner().invoke(main, [os.fspath(a) for a in args])


def cli_error(res, code: int = 1) -> str:
    """The ``error: ...`` line of a failed command, after checking its exit status and that nothing else
    (no traceback) came before it."""
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]
