"""`make doctor` (`python -m lib.doctor --config FILE`): what this machine and a config give the pipeline, in seconds.

A tool beside the pipeline, like lib/demo: it decides nothing and writes nothing. Before an hour
of GPU time (a fresh Kaggle session, a new cluster node) it prints one line per fact: Python,
torch and CUDA, the GPUs with capability and memory, the precision `auto` picks, faiss with or
without GPU, CPU cores against the loader workers the config asks for, free disk under
output_root, and whether the config's data paths and weights exist. Its exit code is 1 on a fatal problem (a path the
config names is missing, output_root is not writable, or train.device is cuda without a GPU that
the installed torch has kernels for), so the notebook stops before the first stage. `--time`
measures the config's steps here and prints each stage's expected wall time (lib.doctor.timing).
"""
