"""The paper's experiments, one module each, run by launch/experiment.py (golf_dist/commands/experiment.py)."""
