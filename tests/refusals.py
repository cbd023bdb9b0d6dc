"""What a refused ``train`` command prints, checked once for every test that expects a refusal."""

from __future__ import annotations


def one_line(result, command: str = "student") -> str:
    """The refusal's line: exit status 2, no traceback, nothing on stdout, and stderr ending in exactly one line of
    ``train COMMAND:`` (progress bars of a model load may come before it)."""
    lines = result.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith(f"train {command}:")]
    assert result.exit_code == 2 and len(ours) == 1 and lines[-1] == ours[0], result.output
    assert "Traceback" not in result.output and not result.stdout
    return ours[0]
