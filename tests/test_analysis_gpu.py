"""Analysis on GPUs, the parts a machine without one can check: which resources a task asks Ray for,
which precision each measure runs in, the bf16 autocast path itself (on the CPU), and the error when
Ray hands a task a GPU that torch cannot see."""
from __future__ import annotations

import contextlib

import pytest
import torch

from analysis import evaluate, models
from infra.config import ConfigError, load_config
from infra.errors import UserError


def test_tasks_take_a_gpu_share_only_where_the_cluster_has_gpus():
    cfg = load_config(None, ["analysis.gpus_per_task=0.25"])
    assert evaluate.task_resources(cfg, {"CPU": 16.0, "GPU": 2.0}) == {"num_cpus": 1, "num_gpus": 0.25}
    assert evaluate.task_resources(cfg, {"CPU": 16.0}) == {"num_cpus": 1, "num_gpus": 0.0}
    off = load_config(None, ["analysis.gpus_per_task=0"])
    assert evaluate.task_resources(off, {"CPU": 16.0, "GPU": 2.0})["num_gpus"] == 0.0


@pytest.mark.parametrize("value", ["-0.5", "2"])
def test_gpu_share_must_be_a_fraction_of_one_gpu(value):
    with pytest.raises(ConfigError, match="analysis.gpus_per_task"):
        load_config(None, [f"analysis.gpus_per_task={value}"])


def test_bf16_only_on_gpu_and_only_where_the_measure_allows():
    cfg = load_config(None, [])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for measure in ("accuracy", "fourier", "occlusion", "shape_bias", "cka"):
        assert evaluate.precision_for(cfg, measure, cuda) is not contextlib.nullcontext
        assert evaluate.precision_for(cfg, measure, cpu) is contextlib.nullcontext
    for measure in ("gradcam", "adversarial"):  # float32: see analysis/evaluate.py
        assert evaluate.precision_for(cfg, measure, cuda) is contextlib.nullcontext
    off = load_config(None, ["analysis.bf16=false"])
    assert evaluate.precision_for(off, "accuracy", cuda) is contextlib.nullcontext


@pytest.mark.slow
def test_bf16_autocast_path_runs_and_agrees(tmp_path):
    """The measures under bf16 autocast (here on the CPU, as a GPU would run them) give nearly the float32 numbers."""
    cfg = load_config(None, ["data.image_size=32", "analysis.cka_samples=16", "analysis.cka_batch_size=8",
                             "analysis.fourier_radii=[0.3,1.0]", "analysis.occlusion_fractions=[0.0,0.5]"])
    torch.manual_seed(0)
    for name in ("student_independent", "teacher_vit"):
        path = models.model_path(tmp_path, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(models.build_model(cfg, name).state_dict(), path)
    model = models.load_model(cfg, tmp_path, "student_independent")
    g = torch.Generator().manual_seed(0)
    # a "test set" the model gets right: its own float32 predictions as labels
    x = torch.rand(32, 3, 32, 32, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    d = {"x": x, "y": y, "tex": None, "masks": None, "images": None, "n": 32}
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert evaluate.run_measure(cfg, tmp_path, model, "student_independent", "accuracy", d) == 1.0
    assert evaluate.run_measure(cfg, tmp_path, model, "student_independent", "accuracy", d, bf16) >= 0.8
    full = evaluate.run_measure(cfg, tmp_path, model, "student_independent", "cka", d)
    half = evaluate.run_measure(cfg, tmp_path, model, "student_independent", "cka", d, bf16)
    assert abs(torch.tensor(full["matrix"]) - torch.tensor(half["matrix"])).max() < 0.05
    curves = evaluate.run_measure(cfg, tmp_path, model, "student_independent", "fourier", d, bf16)
    assert len(curves["low"]) == 2 and 0.8 <= curves["clean"] <= 1.0


def test_a_gpu_that_torch_cannot_see_is_a_clear_error(monkeypatch):
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="10.0.0.7.*gpus_per_task=0"):
        evaluate.task_device()
