"""The ``prinmix`` command group: exit statuses, the help epilog, and how errors reach the user (one line
``error: ...`` on stderr, no traceback unless ``PRINMIX_DEBUG=1``). Subcommands are added in
:mod:`prinmix_jax.cli`."""
from __future__ import annotations

import io
import os
import sys
import traceback

import click

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_DEGENERATE", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "epilog",
           "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
#: Finished, but the result is degenerate (nothing kept, base == fine-tuned) or over budget.
EXIT_DEGENERATE = 3
#: Exit status of a command whose stdout was closed early (``prinmix inspect DELTA | head -1``): the
#: shell's 128 + SIGPIPE.
EXIT_BROKEN_PIPE = 141

_EPILOG = """\b
Exit status:
  0    success
  1    error (bad input, wrong base, existing output, unwritable folder, ...);
       one line "error: ..." on stderr, nothing half-written is left behind
  2    usage error (unknown option, missing argument, bad option value)
  3    compress finished but the result is degenerate or over budget (the delta
       is written; the reason is on stderr)
  130  interrupted (Ctrl-C); rerun the same compress command to resume
  141  stdout closed early (e.g. piped into head); output stops quietly
Set PRINMIX_DEBUG=1 to see tracebacks.
"""


def epilog(*extra_lines: str) -> str:
    """The "Exit status:" block of one command's help: the statuses every command shares (0, 1, 2, 141),
    then ``extra_lines`` (that command's own, e.g. ``"3    ..."``; a line may hold ``\\n``-separated
    continuation lines, indented by 5 spaces to align), then the PRINMIX_DEBUG line."""
    lines = ["0    success",
             '1    error (bad input, missing or unreadable file, ...);\n     one line "error: ..." on stderr',
             "2    usage error (unknown option, missing argument, bad option value)",
             *extra_lines,
             f"{EXIT_BROKEN_PIPE}  stdout closed early (e.g. piped into head); output stops quietly"]
    body = "\n".join("  " + ln for line in lines for ln in line.split("\n"))
    return f"\b\nExit status:\n{body}\nSet PRINMIX_DEBUG=1 to see tracebacks.\n"


#: What the "interrupted" line adds, per command (only what that command does).
_INTERRUPTED_HINT = {"compress": " (rerun the same command to resume)",
                     "apply": " (nothing was written; rerun to start again)",
                     "distill": " (OUT was not written; rerun to start again)"}


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())


def _guard_stdout():
    """Keeps stdout for what a command means to print: C libraries write there too (HiGHS prints its banner
    on file descriptor 1), which would break ``--json | python -m json.tool``. While the command runs, fd 1
    points at stderr and ``sys.stdout`` writes to a copy of the real stdout. Returns the undo function (a
    no-op where stdout is not fd 1, e.g. click's test runner)."""
    try:
        if sys.stdout is None or sys.stdout.fileno() != 1:
            return lambda: None
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return lambda: None
    real = sys.stdout
    sys.stdout = open(saved, "w", encoding=real.encoding or "utf-8", errors=real.errors or "strict",  # noqa: SIM115
                      buffering=1, closefd=False)  # closed by restore()

    def restore():
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        sys.stdout = real
        os.dup2(saved, 1)
        os.close(saved)

    return restore


class _Main(click.Group):
    """Turns exceptions into ``error: ...`` and exit status 1 (no traceback unless PRINMIX_DEBUG=1)."""

    def invoke(self, ctx):
        restore = _guard_stdout()
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            # The reader of stdout went away (`prinmix inspect DELTA | head -1`): stop quietly. Point stdout at
            # devnull so flushing it at exit cannot fail again (docs.python.org/3/library/signal.html#note-on-sigpipe).
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # stdout without a real file descriptor (e.g. captured in tests)
                pass
            ctx.exit(EXIT_BROKEN_PIPE)
        except KeyboardInterrupt:
            click.echo(f"error: interrupted{_INTERRUPTED_HINT.get(ctx.invoked_subcommand, '')}", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as e:  # noqa: BLE001 -- every other error becomes a user-facing one-liner
            if os.environ.get("PRINMIX_DEBUG"):
                traceback.print_exc()
            known = isinstance(e, (ValueError, OSError, TypeError, KeyError)) or type(e).__module__.startswith(
                "prinmix_jax")
            prefix = "" if known else f"internal error ({type(e).__name__}): "
            click.echo(f"error: {prefix}{_one_line(e)}", err=True)
            ctx.exit(EXIT_ERROR)
        finally:
            restore()


@click.group(cls=_Main, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="prinmix-jax", prog_name="prinmix")
def main():
    """PrinMix: store a fine-tuned LLM as its base plus a ~1 bit/param delta.

    \b
    Typical use:
      prinmix compress BASE FINETUNED delta/ --calib calib.jsonl
      prinmix inspect delta/ --plot bits.png
      prinmix apply BASE delta/ merged/        # a Hugging Face checkpoint

    BASE and FINETUNED are Hugging Face checkpoint folders (config.json + *.safetensors) of the same
    architecture (Llama, Mistral, Qwen2, Qwen3).
    """
