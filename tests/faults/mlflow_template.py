"""Create an empty MLflow SQLite store at argv[1] (run once per session through the fork server): every
training run of the fault suite gets a copy, so none of them pays MLflow's ~5 s of schema migrations."""

import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
client.search_experiments()  # creates the schema; experiments are made by each run, beside its copy

