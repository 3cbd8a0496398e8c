"""The command lines, each a `main(argv)` and a `cli()` entry point (pyproject.toml [project.scripts]);
launch/ and data_prep/ hold thin wrappers that run the same. launch.py is the launcher command
(`python -m golf_dist.commands.launch`, which infra/slurm/ runs); common.py is what every command line shares."""
