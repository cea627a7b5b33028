"""The loaders' host budget (lib.data.budget) on made-up hosts: workers per process, bytes in flight against the shares."""
import pytest

from lib.config import ConfigError, load_config
from lib.data.budget import GiB, Host, batch_bytes, plan_loaders

MiB = 2**20


def recipe(*extra: str):
    return load_config("configs/fathomnet2025.yaml", ["train.num_workers=auto", *extra])


def test_one_batch_is_rows_views_channels_pixels_float32():
    # The figure: 256 ROIs x 2 views at 224 px in fp32 is 294 MiB.
    assert batch_bytes(256, 2, 224) == 256 * 2 * 3 * 224 * 224 * 4
    assert round(batch_bytes(256, 2, 224) / MiB) == 294


def test_two_simulated_gpus_halve_the_cores_of_each_process():
    cfg = recipe()
    one = plan_loaders(cfg, cores=8, ram_bytes=64 * GiB, shm_bytes=32 * GiB, processes=1)
    two = plan_loaders(cfg, cores=8, ram_bytes=64 * GiB, shm_bytes=32 * GiB, processes=2)
    assert Host(8, 0, 0, 2).cores_per_process == 4
    assert {b.workers for b in one.loaders} == {8} and {b.workers for b in two.loaders} == {4}
    # On the CPU the process computes: one core fewer for the workers; one core alone loads in the main process.
    assert plan_loaders(cfg, 8, 64 * GiB, 32 * GiB, 2, on_cpu=True).get("train").workers == 3
    assert plan_loaders(cfg, 1, 64 * GiB, 32 * GiB, 1, on_cpu=True).get("train").workers == 0


def test_bytes_in_flight_sum_the_persistent_loaders_and_fit_the_share():
    """Plenty of memory: the formula batch x views x 3 x size^2 x 4 x prefetch x workers, fold loaders summed."""
    cfg = recipe()
    plan = plan_loaders(cfg, cores=4, ram_bytes=256 * GiB, shm_bytes=128 * GiB, processes=2)
    train, val = batch_bytes(64, 2, 224), batch_bytes(256, 2, 224)
    assert plan.get("train").bytes_in_flight == train * 4 * 2
    assert plan.bytes_in_flight == (train + 2 * val) * 4 * 2  # train + val + test-like, 2 workers each, prefetch 4
    assert plan.limit_bytes == int(min(0.5 * 256, 0.5 * 128) * GiB / 2)  # the smaller share, split over the processes


def test_the_kaggle_host_lowers_prefetch_then_the_eval_batch():
    """Kaggle's 2xT4: 4 cores, 29 GiB RAM, /dev/shm assumed half of it; two fold processes. The recipe's eval batch of
    256 rows (294 MiB) fits once prefetch drops, and the plan stays within its share."""
    cfg = recipe()
    plan = plan_loaders(cfg, cores=4, ram_bytes=29 * GiB, shm_bytes=int(14.5 * GiB), processes=2)
    assert plan.limit_bytes == int(0.5 * 14.5 * GiB / 2)
    assert plan.bytes_in_flight <= plan.limit_bytes
    assert {b.workers for b in plan.loaders} == {2}
    assert plan.get("val").prefetch < 4 and plan.get("train").prefetch == 4  # the big eval batches give way first
    assert round(plan.bytes_in_flight / GiB, 2) == 3.45  # README's table (Loader workers)
    tight = plan_loaders(cfg, cores=4, ram_bytes=29 * GiB, shm_bytes=2 * GiB, processes=2)
    assert tight.get("val").batch < 256 and tight.bytes_in_flight <= tight.limit_bytes
    assert tight.get("train").batch == 64  # the training batch is never changed: it changes results


def test_a_batch_that_cannot_fit_is_one_sentence_naming_batch_share_and_fix():
    cfg = recipe("train.batch_size=512")
    with pytest.raises(ConfigError) as e:
        plan_loaders(cfg, cores=4, ram_bytes=29 * GiB, shm_bytes=1 * GiB, processes=2)
    msg = str(e.value)
    assert msg.count(". ") == 0 and msg.endswith(".")
    assert "train.batch_size 512" in msg and "train.shm_share 0.5" in msg and "lower train.batch_size" in msg
    # Under frame attention the eval batch decides how frames are chunked: it is kept, and said so.
    attn = recipe("model.frame_context=attention")
    with pytest.raises(ConfigError, match="eval_batch_size is kept"):
        plan_loaders(attn, cores=4, ram_bytes=29 * GiB, shm_bytes=1 * GiB, processes=2)


def test_more_workers_than_cores_is_refused_not_clamped():
    """Workers seed a training batch's augmentation, so a clamp would change results per machine: one sentence instead."""
    cfg = load_config("configs/fathomnet2025.yaml", ["train.num_workers=8"])
    with pytest.raises(ConfigError) as e:
        plan_loaders(cfg, cores=4, ram_bytes=29 * GiB, shm_bytes=14 * GiB, processes=2)
    assert str(e.value) == ("train.num_workers 8 asks for more loader workers than the 2 cores this process may use "
                            "(4 cores shared by 2 processes); set train.num_workers: auto or at most 2.")
    assert plan_loaders(cfg, cores=8, ram_bytes=64 * GiB, shm_bytes=32 * GiB).get("train").workers == 8


def test_auto_and_the_shares_in_the_config():
    cfg = recipe("train.host_memory_share=0.25")
    assert cfg.train.num_workers == "auto" and cfg.train.host_memory_share == 0.25
    for bad, words in (("train.num_workers=many", "must be int or 'auto'"), ("train.shm_share=1.5", "train.shm_share"),
                       ("train.val_every=16", "train.val_every 16 is more than the 15 epochs")):
        with pytest.raises(ConfigError, match=words):
            load_config("configs/fathomnet2025.yaml", [bad])


def test_host_shares_stay_out_of_the_digest_val_every_stays_in():
    from lib.pipeline.graph import SPECS
    from lib.pipeline.records import Stage

    def config_of(*extra):
        cfg = load_config("configs/demo.yaml", list(extra))
        return Stage.create("01_train", "/tmp/x", cfg, SPECS["01_train"].sections, "01_train_folds.py").fingerprint["config"]

    base = config_of()
    assert config_of("train.host_memory_share=0.2", "train.shm_share=0.9") == base
    assert "train.host_memory_share" not in base and base["train.val_every"] == 1
    assert config_of("train.val_every=2") != base
