"""A trained F + G at work on images, as parts a reader finds by name:

engine.py             how F + G run on an image (PyTorch or ONNX Runtime; a count of G iterations or auto),
                      load_trained (an output folder's F, G)
tiling.py             overlapping tiles for frames larger than memory allows
ensemble.py           the self-ensemble: averaged over flips and transposes
deblur.py             golf-deblur's work: images in, deblurred PNGs out
export.py             golf-export's work: the ONNX graphs, checked against PyTorch, and their manifest
mlflow_model.py       F + G as an MLflow pyfunc model; register_model (golf-evaluate --register)
mlflow_model_code.py  the file MLflow logs as the model's code (it loads mlflow_model.py)
"""
