"""``m2d completion SHELL``: the shell completion script of m2d.

    eval "$(m2d completion bash)"        # in ~/.bashrc
    eval "$(m2d completion zsh)"         # in ~/.zshrc
    m2d completion fish > ~/.config/fish/completions/m2d.fish

Commands, options, stages, cluster profiles and run names complete (``orchestrator.completion``).
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish).

    bash: eval "$(m2d completion bash)" in ~/.bashrc; zsh: the same in ~/.zshrc; fish:
    m2d completion fish > ~/.config/fish/completions/m2d.fish
    """
    from orchestrator.cli import cli

    script = get_completion_class(shell)(cli, {}, "m2d", "_M2D_COMPLETE").source()
    click.echo(script, nl=not script.endswith("\n"))
