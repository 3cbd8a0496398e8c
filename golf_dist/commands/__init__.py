"""The command lines, each a `main(argv)` and a `cli()` entry point (pyproject.toml [project.scripts]);
launch/ and data_prep/ hold thin wrappers that run the same."""
