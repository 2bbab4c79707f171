"""Command-line front ends: thin typer apps over the Python API, one module per command."""
