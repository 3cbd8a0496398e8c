"""Create an empty MLflow SQLite store at argv[1], once per test session (tests/conftest.py,
`mlflow_template`): every tiny training config of the suite gets a copy, so no run pays
MLflow's schema migrations (1.5-5 s on 2 cores) again. The runs still write to a real SQLite store."""

import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
client.search_experiments()  # creates the schema; experiments are made by each run, beside its copy
