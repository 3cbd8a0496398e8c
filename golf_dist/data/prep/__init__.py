"""Offline data preparation, never imported by training (tests/test_architecture.py checks it):

sharding.py      golf-shard's writer: GoPro pairs into WebDataset shards and their manifest
shard_files.py   the shard targets (a folder or an S3 prefix), each shard written whole or not at all
shard_verify.py  golf-shard --verify: every shard and index against the manifest
gopro.py         the GoPro folder layout: its pairs, checked
synthetic.py     a synthetic GoPro-like data set (data_prep/synth_gopro.py)
scenes.py        procedural scenes for its content
kernels.py       its blur kernels and noise, and kernel shapes it never draws
held_out.py      photographs it never uses

golf-evaluate --held-out (golf_dist/evaluation/held_out.py) reads held_out.py and kernels.py, nothing else here.
"""
