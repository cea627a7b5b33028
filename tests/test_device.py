"""Device and precision policy (lib.model.device), on simulated GPUs: this machine has no CUDA device, so
torch.cuda's answers (availability, compute capability, bf16 support, properties, arch list) are monkeypatched."""
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lib.config import ConfigError, load_config
from lib.core.errors import StageError
from lib.model import device as D

# compute capability -> the GPU it stands for and whether torch reports native bf16 there
GPUS = {(6, 0): ("Tesla P100-PCIE-16GB", False), (7, 5): ("Tesla T4", False), (8, 0): ("NVIDIA A100-SXM4-40GB", True),
        (9, 0): ("NVIDIA H100 80GB HBM3", True)}


def simulate_gpu(monkeypatch, capability: tuple[int, int], bf16: bool | None = None, arches: list[str] | None = None) -> None:
    """Make torch.cuda answer as a machine with one GPU of `capability` would (nothing runs on it)."""
    name, native = GPUS.get(capability, ("Simulated GPU", capability >= (8, 0)))
    native = native if bf16 is None else bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches if arches is not None else ["sm_60", "sm_75", "sm_80", "sm_90"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        name=name, total_memory=16 * 2**30, major=capability[0], minor=capability[1]))
    monkeypatch.setattr(torch.version, "cuda", "12.6")


@pytest.mark.parametrize("capability, expected", [((6, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpu(monkeypatch, capability, expected):
    """auto: bf16 from compute capability 8.0 (native bf16), fp16 with a GradScaler on P100 (6.0) and T4 (7.5)."""
    simulate_gpu(monkeypatch, capability)
    name, reason = D.precision_policy(torch.device("cuda"), "auto")
    assert name == expected
    assert f"compute capability {capability[0]}.{capability[1]}" in reason
    assert ("GradScaler" in reason) == (expected == "fp16")
    scaler = D.grad_scaler(torch.device("cpu"), name)  # the trainer builds one exactly for fp16
    assert (scaler is not None) == (expected == "fp16")


def test_torch_reporting_native_bf16_is_enough(monkeypatch):
    """A GPU below 8.0 whose torch says it has native bf16 (a future or non-NVIDIA part) gets bf16."""
    simulate_gpu(monkeypatch, (7, 5), bf16=True)
    assert D.precision_policy("cuda", "auto")[0] == "bf16"


def test_the_cpu_runs_fp32_whatever_is_asked():
    for requested in ("auto", "fp32", "bf16", "fp16"):
        name, reason = D.precision_policy(torch.device("cpu"), requested)
        assert name == "fp32" and reason.startswith("cpu: fp32")
    assert "applies to CUDA GPUs only" in D.precision_policy("cpu", "fp16")[1]


def test_explicit_precisions_are_honoured_on_a_gpu(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5))
    assert D.precision_policy("cuda", "fp32")[0] == "fp32"
    assert D.precision_policy("cuda", "fp16")[0] == "fp16"
    name, reason = D.precision_policy("cuda", "bf16")  # honoured, with what it costs there
    assert name == "bf16" and "no native bf16" in reason and "auto picks fp16" in reason
    with pytest.raises(ValueError):
        D.precision_policy("cuda", "fp8")


def test_train_precision_is_a_checked_config_value_in_every_predicting_stage():
    """A typo is one sentence; the value is recorded by every stage that trains or predicts (01, 02, 03, 04, knn)."""
    from lib.pipeline.graph import SPECS

    assert load_config("configs/demo.yaml").train.precision == "auto"
    with pytest.raises(ConfigError, match="train.precision.*(bf16|fp16)"):
        load_config("configs/demo.yaml", ["train.precision=fp61"])
    cfg = load_config("configs/demo.yaml", ["train.precision=fp16"])
    from lib.pipeline.records import Stage

    for name in ("01_train", "02_pseudo", "03_retrain", "04_submit", "knn"):
        st = Stage.create(name, "/tmp/x", cfg, SPECS[name].sections, "01_train_folds.py")
        assert st.fingerprint["config"]["train.precision"] == "fp16", name


def test_autocast_picks_the_policy_dtype():
    cpu = torch.device("cpu")
    assert isinstance(D.autocast(cpu), contextlib.nullcontext)  # auto on the CPU: fp32, no autocast at all
    assert isinstance(D.autocast(cpu, "fp32"), contextlib.nullcontext)
    with D.autocast(cpu, "fp16"):  # what a CUDA device gets under fp16, here on the CPU's autocast
        assert torch.get_autocast_dtype("cpu") == torch.float16 and torch.is_autocast_enabled("cpu")
    with D.autocast(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cuda_without_a_gpu_stops_with_one_sentence(monkeypatch):
    """train.device=cuda and no usable GPU: what to switch on or check, naming torch's version and CUDA build."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    with pytest.raises(StageError) as e:
        D.pick_device("cuda")
    msg = str(e.value)
    assert torch.__version__ in msg and "CUDA 12.6" in msg and "GPU accelerator" in msg and "nvidia-smi" in msg
    assert "train.device=auto" in msg and msg.count(". ") == 0 and msg.endswith(".")
    assert D.pick_device("auto").type == "cpu"  # auto quietly runs on the CPU
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(StageError, match=r"a CPU-only build\) cannot use a GPU; install a CUDA build of torch"):
        D.pick_device("cuda")


def test_a_gpu_the_build_has_no_kernels_for_is_not_usable(monkeypatch, caplog):
    """A P100 (sm_60) under a torch built for sm_75 and up: auto runs on the CPU with a warning, cuda stops and says why."""
    simulate_gpu(monkeypatch, (6, 0), arches=["sm_75", "sm_80", "sm_90", "compute_90"])
    assert "no kernels for Tesla P100" in (D.cuda_problem() or "")
    assert D.pick_device("auto").type == "cpu" and D.pick_device("auto").type == "cpu"
    assert caplog.text.count("train.device=auto runs on the CPU: torch") == 1  # said once
    with pytest.raises(StageError, match="compute capability 6.0"):
        D.pick_device("cuda")
    simulate_gpu(monkeypatch, (8, 6), arches=["sm_75", "sm_80", "sm_90"])  # an sm_80 binary runs on 8.6
    assert D.cuda_problem() is None and D.pick_device("cuda") == torch.device("cuda")


def test_runs_on_reads_the_arch_list():
    assert D._runs_on(["sm_75"], 7, 5) and D._runs_on(["sm_80"], 8, 9) and not D._runs_on(["sm_80"], 9, 0)
    assert D._runs_on(["compute_80"], 9, 0) and not D._runs_on(["sm_90", "sm_100"], 8, 0)
    assert D._runs_on(["sm_120"], 12, 0) and not D._runs_on(["sm_120"], 10, 0)


def test_describe_device_names_the_gpu_its_memory_and_the_precision(monkeypatch):
    simulate_gpu(monkeypatch, (7, 5))
    line = D.describe_device(torch.device("cuda", 0), "auto")
    assert line.startswith("cuda:0 Tesla T4 (16.0 GiB, compute capability 7.5), fp16: ")
    assert D.describe_device("cpu").startswith("cpu (") and "fp32" in D.describe_device("cpu", "auto")


def test_importing_the_device_module_needs_no_torch():
    """A doctor command can import the helpers without paying for torch (they import it when called)."""
    import subprocess
    import sys

    code = "import sys, lib.model.device as d; print('torch' in sys.modules, d.choose_precision('auto', 'cuda', (7, 5), False)[0])"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "fp16"]
