"""The `annotate` command line. It only parses arguments and calls into the package."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="LongGRIT: annotate GRIT-20M regions with vision-language models; train PixCLIP on them.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Local model utilities (tiny random-weight models for CPU runs).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.command()
def version() -> None:
    """Print the package version."""
    from annotate import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
