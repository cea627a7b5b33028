"""torchrun helpers (lib.model.dist): collectives on the rank's device, rank 0 alone writes, the global batch.

NCCL serves CUDA tensors only. There is no GPU here, so a gloo group bound to cuda alone
(`backend="cuda:gloo"`, the same device map NCCL has) stands in for it: it rejects CPU tensors
exactly as NCCL does, and the helpers are checked to ask for their tensors on the rank's GPU.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lib.config import load_config
from lib.core.errors import StageError
from lib.model import dist as ddp
from lib.pipeline import graph

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def group(tmp_path):
    """A one-process group with the backend asked for; destroyed afterwards."""
    def start(backend: str) -> None:
        dist.init_process_group(backend=backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    yield start
    ddp.close()
    assert not dist.is_initialized()


def test_a_cuda_bound_group_rejects_cpu_tensors_and_the_helpers_ask_for_the_gpu(group, monkeypatch):
    group("cuda:gloo")
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.broadcast(torch.tensor([1]), src=0)  # what broadcast_flag did before: the first epoch's crash under NCCL
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.collective_device() == torch.device("cuda", 1)

    asked, sent = [], []
    real_tensor = torch.tensor

    def tensor(data, device=None, **kw):  # no GPU to put it on: record where it was asked for
        asked.append(torch.device(device) if device is not None else torch.device("cpu"))
        return real_tensor(data, **kw)

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(dist, "broadcast", lambda t, src: sent.append(t))
    monkeypatch.setattr(dist, "barrier", lambda **kw: sent.append(kw))
    assert ddp.broadcast_flag(True) is True
    ddp.barrier()
    assert asked == [torch.device("cuda", 1)]
    assert sent[1] == {"device_ids": [1]}  # the barrier on this rank's own GPU


def test_the_helpers_run_on_a_cpu_group(group):
    group("gloo")
    assert ddp.collective_device() == torch.device("cpu")
    assert ddp.broadcast_flag(True) is True and ddp.broadcast_flag(False) is False
    ddp.barrier()


def test_without_torchrun_the_helpers_are_no_ops():
    assert not dist.is_initialized()
    assert ddp.broadcast_flag(True) is True and ddp.collective_device() == torch.device("cpu")
    ddp.barrier()
    ddp.close()


def test_the_batch_size_is_global():
    assert ddp.rank_batch(64, 1) == 64 and ddp.rank_batch(64, 2) == 32 and ddp.rank_batch(64, 8) == 8
    with pytest.raises(StageError, match=r"train.batch_size 63 does not split evenly over 2 torchrun processes; set it to a multiple of 2\.$"):
        ddp.rank_batch(63, 2)


def test_only_rank_0_voids_the_record_and_writes_the_config(tmp_path, monkeypatch):
    cfg = load_config("configs/demo.yaml", [f"output_root={tmp_path}", f"data.root={tmp_path / 'data'}"])
    monkeypatch.setattr(graph, "preflight", lambda cfg, name: None)  # no input files here
    folder = tmp_path / "demo" / "00_prepare"
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(json.dumps({"fingerprint": {}}))
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        monkeypatch.setenv("RANK", "1")
        assert graph.begin(cfg, "00_prepare", force=True, dry_run=False) is not None
        assert (folder / "record.json").is_file() and not (folder / "config.yaml").exists()
        monkeypatch.setenv("RANK", "0")
        graph.begin(cfg, "00_prepare", force=True, dry_run=False)
        assert not (folder / "record.json").exists() and (folder / "config.yaml").is_file()
    finally:
        from lib.core.locks import release_locks

        release_locks()
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


WORKER = '''
import sys
import torch
from types import SimpleNamespace
from torch.utils.data import TensorDataset
from lib.engine.train import _epoch_loader
from lib.model import dist as ddp
from lib.model.optim import optimizer_step

ddp.init("cpu")
torch.manual_seed(0)
x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
ds = TensorDataset(x, y, torch.ones(16))
model = torch.nn.Linear(5, 3)
wrapped = torch.nn.parallel.DistributedDataParallel(model)
run = SimpleNamespace(ds=ds, batch=ddp.rank_batch(16, ddp.world_size()), device=torch.device("cpu"), train_loader=None)
loader = _epoch_loader(run, SimpleNamespace(sampler="random"), y.numpy(), 7, torch.Generator().manual_seed(7))
opt = torch.optim.AdamW(model.parameters(), lr=0.05)
rows = []
for xb, yb, _ in loader:
    torch.nn.functional.cross_entropy(wrapped(xb), yb).backward()
    optimizer_step(opt, model.parameters(), 1.0)
    rows.append(len(xb))
if ddp.is_main():
    torch.save({"state": model.state_dict(), "rows": rows}, sys.argv[1])
ddp.close()
'''


def run_two_ranks(tmp_path: Path, worker: str) -> None:
    """`worker` (a script's source, given out.pt's path as its argument) on 2 gloo ranks under torchrun, one thread each."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(tmp_path / "out.pt")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_step_as_one_process_with_the_global_batch(tmp_path):
    """train.batch_size 16 on 2 ranks: 8 rows each, one step, and the same weights as one process stepping on all 16 rows
    at the same learning rate (DDP averages the two ranks' mean gradients into the global batch's mean)."""
    run_two_ranks(tmp_path, WORKER)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["rows"] == [8]

    from lib.model.optim import optimizer_step

    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    model = torch.nn.Linear(5, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer_step(opt, model.parameters(), 1.0)
    for k, v in model.state_dict().items():
        assert torch.allclose(got["state"][k], v, atol=1e-6), k


FRAME_WORKER = '''
import sys
import numpy as np
import torch
from types import SimpleNamespace
from torch.utils.data import Dataset
from lib.engine.train import _epoch_loader
from lib.model import dist as ddp
from lib.model.frame_attention import FrameAttention
from lib.model.optim import optimizer_step

class Rows(Dataset):
    """Rows with frame ids, items as CropDataset gives them with frames: (x, label, weight, frame, row)."""
    def __init__(self, x, y, frames):
        self.x, self.labels, self.frames = x, y.numpy(), frames
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], int(self.labels[i]), 1.0, int(self.frames[i]), i

class FrameNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frames, self.fc = FrameAttention(6, width=4, heads=2), torch.nn.Linear(6, 3)
    def forward(self, x, frames=None):
        return self.fc(self.frames(x, frames))

ddp.init("cpu")
torch.manual_seed(0)
frames = np.repeat(np.arange(12), [1, 1, 2, 2, 3, 3, 4, 4, 5, 1, 2, 12])  # 40 rows; the frame of 12 is larger than a rank's batch
x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
model = FrameNet()
wrapped = torch.nn.parallel.DistributedDataParallel(model)
run = SimpleNamespace(ds=Rows(x, y, frames), batch=ddp.rank_batch(16, ddp.world_size()), device=torch.device("cpu"), train_loader=None)
opt = torch.optim.AdamW(model.parameters(), lr=0.05)
seen = []
for xb, yb, _, fb, rows in _epoch_loader(run, SimpleNamespace(sampler="random"), y.numpy(), 7, torch.Generator().manual_seed(7)):
    torch.nn.functional.cross_entropy(wrapped(xb, frames=fb), yb).backward()
    optimizer_step(opt, model.parameters(), 1.0)
    seen.append(rows.tolist())
torch.save({"state": model.state_dict(), "rows": seen}, sys.argv[1] + f".{ddp.rank()}")
ddp.close()
'''


@pytest.mark.slow
def test_two_gloo_ranks_split_frames_not_rows(tmp_path):
    """model.frame_context=attention under torchrun: each rank trains on whole frames of its own (a frame larger than the
    rank's batch in chunks), as many batches each, and DDP keeps the frame attention's weights equal on both ranks."""
    import numpy as np

    run_two_ranks(tmp_path, FRAME_WORKER)
    got = [torch.load(tmp_path / f"out.pt.{k}", weights_only=True) for k in (0, 1)]
    frames = np.repeat(np.arange(12), [1, 1, 2, 2, 3, 3, 4, 4, 5, 1, 2, 12])
    assert len(got[0]["rows"]) == len(got[1]["rows"]) >= 2 and all(len(b) <= 8 for g in got for b in g["rows"])
    owned = [{int(frames[i]) for b in g["rows"] for i in b} for g in got]
    assert not (owned[0] & owned[1]) - {11}  # only the frame of 12 rows (chunks) may reach both ranks
    rows = [i for g in got for b in g["rows"] for i in b]
    assert len(rows) == len(set(rows))  # no row twice in the epoch
    for k, v in got[0]["state"].items():
        assert torch.equal(got[1]["state"][k], v), k
    assert got[0]["state"]["frames.blocks.0.proj.weight"].abs().sum() > 0
