"""Thin typer entry points, one per DVC stage; the only code that reads params.yaml."""
