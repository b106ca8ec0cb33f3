"""The pipeline's helpers: what the stage scripts at the repository root share.

One concept a module, imported one way (tests/test_layout.py enforces the order):
common (errors, flags, paths, atomic writes) -> fastparse, datasets, embedding_io, loaders,
losses, metrics -> runtime (running a model), distributed (torchrun), pictures -> search/
(searcher, index, web: image search). The model itself is deep_rank_net.py at the root.
"""
