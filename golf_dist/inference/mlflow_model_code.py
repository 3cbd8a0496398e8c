"""The file MLflow runs to build the Golf pyfunc model when it loads one ("models from code"): the logged
model holds this source, not a pickled Python object, so loading it runs no serialized code."""

import mlflow

from golf_dist.inference.mlflow_model import GolfModel

mlflow.models.set_model(GolfModel())
