"""How well a trained F + G deblurs, as parts a reader finds by name:

validation.py   evaluate_pairs: PSNR and SSIM per G iteration on full frames, exact across ranks (the
                trainer's validation and golf-evaluate's alike)
workflow.py     golf-evaluate's workflow: run_evaluation (figures, MLflow run, evaluation.json), print_result
plots.py        the figures: PSNR against G iteration, blur | F | F + N G | sharp, the experiments' curves
diagnostics.py  for when training does not learn: overfit one batch, the loaders' first crops compared
"""
