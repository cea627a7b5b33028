"""`make doctor` (`python -m lib.doctor --config FILE`): what this machine and a config give the pipeline, in seconds.

A tool beside the pipeline, like lib/demo: it decides nothing and writes nothing. Before an hour
of GPU time (a fresh Kaggle session, a new cluster node) it prints one line per fact: Python,
torch and CUDA, the GPUs with capability and memory, the precision `auto` picks, faiss with or
without GPU, CPU cores against the loader workers the config asks for, free disk under
output_root, and whether the config's data paths and weights exist. Its exit code is 1 when a
path the config names is missing or output_root is not writable, so a notebook cell can stop early.
"""
