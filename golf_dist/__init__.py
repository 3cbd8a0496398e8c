"""golf-dist: train the Golf Optimizer (a residual CNN F, then a recurrent residual CNN G) for deblurring.

Imports run one way: command lines (launch/, data_prep/) -> golf_dist.train / evaluate / deblur ->
data, models, losses, checkpoints, tracking -> config, storage, errors.
"""

__version__ = "0.1.0"
