"""CLI commands beyond the core ones in glasslab.cli, one module per feature."""
