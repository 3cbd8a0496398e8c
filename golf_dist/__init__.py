"""golf-dist: train the Golf Optimizer (a residual CNN F, then a recurrent residual CNN G) for deblurring.

Command lines (launch/, data_prep/) are thin wrappers over this package; inside it there is no import
circle (tests/test_architecture.py), and training never imports the offline shard writer or verifier.
"""

__version__ = "0.1.0"
