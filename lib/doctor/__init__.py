"""`make doctor` (`python -m lib.doctor --config FILE`): what this machine and a config give the pipeline, in seconds.

A tool beside the pipeline, like lib/demo: it decides nothing and writes nothing. Before an hour
of GPU time (a fresh Kaggle session, a new cluster node) it prints one line per fact: Python,
torch and CUDA, the GPUs with capability and memory, the precision `auto` picks, faiss with or
without GPU, CPU cores against the loader workers the config asks for, free disk under
output_root, whether the config's data paths and weights exist, and the training's estimated peak GPU
memory and step time (lib.doctor.memory: the config's Net on the meta device, no weights). Its exit
code is 1 on a fatal problem (a path the config names is missing, output_root is not writable,
train.device is cuda without a GPU that the installed torch has kernels for, or the estimated peak
exceeds the GPU here), so the notebook stops before the first stage. `--time`
measures the config's steps here and prints each stage's expected wall time (lib.doctor.timing).
"""
