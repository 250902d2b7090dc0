"""Default resource requests (measured on the meta device) and how a study and a cluster shape
them: overrides, no-GPU clusters, clipping, cluster launcher files."""

from __future__ import annotations

import math

import pytest
import torch

import models
from models.costs import build_on_meta
from models.errors import ModelError
from sweep.errors import StudyError
from sweep.run.plan import plan_study
from sweep.run.resources import (
    GPU_FRACTIONS,
    ClusterShape,
    NodeShape,
    ResourceRequest,
    detector_request,
    gpu_fraction,
    grown,
    merge_warnings,
    node_type_gpu_memory_gb,
    ray_resources,
    study_image_counts,
    trial_resources,
)
from sweep.run.study import expand_trials, study_from_dict

GPU_NODE = ClusterShape((NodeShape("gpu", cpus=16, gpus=4, gpu_memory_gb=16, memory_gb=120),))
CPU_NODE = ClusterShape((NodeShape("cpu", cpus=8, gpus=0, memory_gb=30),))


def request(model: str, backbone: str | None, size: int, **hparams) -> ResourceRequest:
    return detector_request(models.get_class(model), backbone, hparams, size)


def study(resources: dict | None = None, **space) -> object:
    raw = {
        "name": "resources",
        "dataset": {"kind": "synthetic_glue", "synthetic": {"n_train": 50}},
        "space": {"model": {"grid": ["padim", "stfpm"]}, "backbone": "resnet18", **space},
        "evaluation": {"train_batch_size": 16},
    }
    if resources is not None:
        raw["resources"] = resources
    return study_from_dict(raw)


# --------------------------------------------------------------------------- defaults


def test_requests_grow_with_backbone_and_image_size_and_are_packable():
    small = request("stfpm", "resnet18", 256)
    wide = request("stfpm", "wide_resnet50_2", 256)
    assert wide.gpu_memory_gb > small.gpu_memory_gb and wide.gpu > small.gpu
    sizes = [request("stfpm", "resnet18", size) for size in (128, 256, 512)]
    memory = [r.gpu_memory_gb for r in sizes]
    assert memory == sorted(memory) and memory[0] < memory[-1]
    assert sizes[-1].gpu > sizes[0].gpu
    for r in (small, wide, *sizes):
        assert r.gpu in GPU_FRACTIONS
        assert r.gpu * 16 >= r.gpu_memory_gb or r.gpu == 1.0


def test_iterative_detector_asks_more_than_one_pass_on_the_same_backbone():
    one_pass = request("padim", "resnet18", 256, layers=("layer1", "layer2", "layer3"))
    iterative = request("stfpm", "resnet18", 256, layers=("layer1", "layer2", "layer3"))
    assert iterative.gpu_memory_gb > one_pass.gpu_memory_gb
    assert iterative.cpu > one_pass.cpu
    profile = models.get_class("stfpm").cost_profile("resnet18", {}, 256)
    assert profile.saved_bytes > 0 and profile.train_flops > 2 * profile.forward_flops * 0.9
    assert models.get_class("padim").cost_profile("resnet18", {}, 256).saved_bytes == 0


def test_every_detector_is_measured_on_meta():
    for name in models.list_models():
        profile = models.get_class(name).cost_profile(None, {}, 128, batch_size=2)
        assert not profile.notes, (name, profile.notes)
        assert profile.forward_flops > 0, name
        assert profile.train_flops >= profile.forward_flops, name
        assert profile.trainable_params + profile.frozen_params > 0, name


def test_heavy_reconstruction_detectors_ask_for_more():
    draem, dsr = request("draem", None, 256), request("dsr", None, 256)
    light = request("padim", "resnet18", 256)
    assert draem.gpu_memory_gb > 4 * light.gpu_memory_gb
    assert dsr.gpu_memory_gb > 4 * light.gpu_memory_gb
    assert draem.gpu == dsr.gpu == 1.0


def test_memory_bank_grows_with_training_images():
    patchcore = models.get_class("patchcore")
    few = detector_request(patchcore, "wide_resnet50_2", {}, 256, n_train=50)
    many = detector_request(patchcore, "wide_resnet50_2", {}, 256, n_train=1000)
    assert many.gpu_memory_gb > few.gpu_memory_gb + 4  # 1000 x 1024 patches x 1536 channels
    fewer = patchcore.fit_work("wide_resnet50_2", {"coreset_ratio": 0.01}, 256)
    more = patchcore.fit_work("wide_resnet50_2", {"coreset_ratio": 0.1}, 256)
    assert more.flops > fewer.flops and more.steps > fewer.steps > 0  # greedy iterations


def test_fit_work_counts_epochs_steps_and_fiber_batches():
    stfpm = models.get_class("stfpm")
    one = stfpm.fit_work("resnet18", {}, 128, n_train=64, epochs=1, batch_size=16)
    ten = stfpm.fit_work("resnet18", {}, 128, n_train=64, epochs=10, batch_size=16)
    assert (one.steps, ten.steps) == (4, 40)
    assert ten.flops == pytest.approx(10 * one.flops)
    assert one.traffic_bytes > 0
    # CFlow steps once per fiber batch of every decoder: 16 images x 16x16 layer2 positions
    # / 64 + 16 x 8x8 / 64 + 16 x 4x4 / 64 = 64 + 16 + 4 per training batch.
    cflow = models.get_class("cflow").fit_work("resnet18", {}, 128, n_train=16, batch_size=16)
    assert cflow.steps == 84 * models.hyperparameters("cflow")["epochs"]
    padim = models.get_class("padim")
    assert padim.fit_work("resnet18", {}, 128).steps == 0
    assert padim.predict_work("resnet18", {}, 128).flops > 0


def test_meta_measurement_matches_a_real_forward():
    # The bytes autograd keeps in a real CPU training forward are the ones counted on meta.
    detector = models.create("stfpm", backbone="resnet18", pretrained=False)
    detector.train()
    images = torch.randn(2, 3, 64, 64)
    kept: dict[int, int] = {}
    own = {p.untyped_storage().data_ptr() for p in detector.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in detector.buffers()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        detector.resource_probe(images)
    profile = models.get_class("stfpm").cost_profile("resnet18", {}, 64, batch_size=2)
    assert profile.saved_bytes == sum(kept.values())


def test_profiles_are_memoised_and_ignore_seed_and_weights():
    cls = models.get_class("fastflow")
    first = cls.cost_profile("resnet18", {"seed": 0}, 96, batch_size=4)
    assert cls.cost_profile("resnet18", {"seed": 7, "pretrained": True}, 96, batch_size=4) is first
    assert cls.cost_profile("resnet18", {}, 128, batch_size=4) is not first


def test_meta_build_allocates_nothing_and_downloads_nothing():
    # pretrained=True and a weights file that does not exist: the meta build uses neither.
    cls = models.get_class("patchcore")
    detector = build_on_meta(cls, {"pretrained": True, "weights": "/no/such/weights.pth"})
    assert {p.device.type for p in detector.parameters()} == {"meta"}


def test_request_validation_and_growth():
    with pytest.raises(ModelError, match="whole GPUs"):
        ResourceRequest(gpu=1.5, cpu=1, memory_gb=1, gpu_memory_gb=1)
    with pytest.raises(ModelError, match="cpu > 0"):
        ResourceRequest(gpu=0, cpu=0, memory_gb=1, gpu_memory_gb=1)
    base = ResourceRequest(gpu=0.125, cpu=2, memory_gb=1, gpu_memory_gb=1.5)
    bigger = grown(base, device_gb=5, host_gb=1)
    assert (bigger.gpu, bigger.gpu_memory_gb, bigger.memory_gb) == (0.5, 6.5, 2)
    assert gpu_fraction(1.0) == 0.125 and gpu_fraction(2.1) == 0.25 and gpu_fraction(40) == 1.0
    assert gpu_fraction(10, gpu_memory_gb=80) == 0.125


# --------------------------------------------------------------------------- trial requests


def test_study_overrides_win_in_order():
    default = study()
    padim, stfpm = expand_trials(default)
    base = trial_resources(default, padim, GPU_NODE)
    assert base == detector_request(
        models.get_class("padim"), "resnet18", padim.hparams, 256, batch_size=16, n_train=50
    )
    wide = study({"cpu": 3, "gpu": 0.5})
    assert trial_resources(wide, padim, GPU_NODE).cpu == 3
    assert trial_resources(wide, padim, GPU_NODE).gpu == 0.5
    per_model = study({"cpu": 3, "gpu": 0.5, "models": {"stfpm": {"gpu": 1, "memory_gb": 12}}})
    stfpm_request = trial_resources(per_model, stfpm, GPU_NODE)
    assert (stfpm_request.cpu, stfpm_request.gpu, stfpm_request.memory_gb) == (3, 1, 12)
    padim_request = trial_resources(per_model, padim, GPU_NODE)
    assert (padim_request.cpu, padim_request.gpu) == (3, 0.5)
    assert padim_request.memory_gb == base.memory_gb  # not overridden: the default


def test_a_models_own_training_batch_sizes_its_request():
    default = study()
    small = study_from_dict(
        {
            "name": "resources",
            "dataset": {"kind": "synthetic_glue", "synthetic": {"n_train": 50}},
            "space": {"model": {"grid": ["padim", "stfpm"]}, "backbone": "resnet18"},
            "evaluation": {"train_batch_size": 16, "models": {"stfpm": {"train_batch_size": 2}}},
        }
    )
    padim, stfpm = expand_trials(default)
    assert trial_resources(small, stfpm, GPU_NODE) == detector_request(
        models.get_class("stfpm"), "resnet18", stfpm.hparams, 256, batch_size=2, n_train=50
    )
    assert (
        trial_resources(small, stfpm, GPU_NODE).gpu_memory_gb
        < trial_resources(default, stfpm, GPU_NODE).gpu_memory_gb
    )
    assert trial_resources(small, padim, GPU_NODE) == trial_resources(default, padim, GPU_NODE)


def test_no_gpu_cluster_runs_on_cpu_with_the_device_memory_on_the_host():
    plain = study()
    trial = expand_trials(plain)[1]
    warnings: list[str] = []
    on_cpu = trial_resources(plain, trial, CPU_NODE, warnings)
    on_gpu = trial_resources(plain, trial, GPU_NODE)
    assert on_cpu.gpu == 0 and on_gpu.gpu > 0
    assert on_cpu.memory_gb > on_gpu.memory_gb
    assert not warnings
    asked = study({"gpu": 0.25})
    trial_resources(asked, trial, CPU_NODE, warnings)
    assert any("no GPU" in w and "0.25" in w for w in warnings)


def test_gpu_share_is_sized_for_the_cluster_gpus():
    plain = study()
    stfpm = expand_trials(plain)[1]
    big = ClusterShape((NodeShape("a100", cpus=32, gpus=8, gpu_memory_gb=80, memory_gb=500),))
    reference = trial_resources(plain, stfpm, GPU_NODE)
    assert trial_resources(plain, stfpm, big).gpu <= reference.gpu
    assert trial_resources(plain, stfpm, big).gpu == gpu_fraction(reference.gpu_memory_gb, 80)


def test_requests_larger_than_any_node_are_clipped_with_a_warning():
    greedy = study({"cpu": 64, "memory_gb": 500, "gpu": 8})
    trial = expand_trials(greedy)[0]
    warnings: list[str] = []
    clipped = trial_resources(greedy, trial, GPU_NODE, warnings)
    assert (clipped.cpu, clipped.gpu, clipped.memory_gb) == (16, 4, 120)
    assert len(warnings) == 3 and all("clipped" in w for w in warnings)
    assert "padim/resnet18 256px" in warnings[0]


def test_memory_warning_when_the_estimate_exceeds_the_share():
    cramped = study({"models": {"stfpm": {"gpu": 0.125}}}, image_size=512)
    trial = expand_trials(cramped)[1]
    warnings: list[str] = []
    trial_resources(cramped, trial, GPU_NODE, warnings)
    assert any("may run out of memory" in w for w in warnings)


def test_a_trial_that_cannot_be_built_asks_for_little_and_warns():
    bad = study(**{"padim.n_features": 100000})
    padim = expand_trials(bad)[0]
    warnings: list[str] = []
    request = trial_resources(bad, padim, GPU_NODE, warnings)
    assert (request.gpu, request.cpu) == (0, 1)
    assert any("cannot be built" in w and "n_features" in w for w in warnings)
    plan = plan_study(bad, GPU_NODE)
    assert plan.trials[0].source == "unknown" and plan.trials[1].source == "model"


def test_merge_warnings_groups_subjects_of_one_message():
    lines = [
        "a 64px: cpu 4 is more than the largest node has; clipped to 2",
        "b 64px: cpu 4 is more than the largest node has; clipped to 2",
        "a 64px: cpu 4 is more than the largest node has; clipped to 2",
        "c 64px: something else",
    ]
    assert merge_warnings(lines) == [
        "cpu 4 is more than the largest node has; clipped to 2 (a 64px, b 64px)",
        "c 64px: something else",
    ]


def test_ray_resources_and_image_counts():
    r = ResourceRequest(gpu=0.25, cpu=2, memory_gb=1.5, gpu_memory_gb=3)
    assert ray_resources(r) == {"cpu": 2, "gpu": 0.25, "memory": 1.5 * 2**30}
    # 50 training images; 20 + 4 x 7 validation and 40 + 6 x 7 test images (7 defect types).
    assert study_image_counts(study()) == (50, 130)


def test_local_cluster_with_assumed_gpus():
    shape = ClusterShape.local(gpus=2)
    assert shape.gpus == 2 and shape.cpus >= 1
    assert shape.gpu_memory_gb is not None
    assert "2 GPUs" in shape.describe()
    with pytest.raises(StudyError, match="--gpus"):
        ClusterShape.local(gpus=-1)


# --------------------------------------------------------------------------- cluster files

CLUSTER_YAML = """
cluster_name: sweep
max_workers: 5
head_node_type: head
available_node_types:
  head:
    resources: {CPU: 4, GPU: 0, memory: 17179869184}
    min_workers: 0
    max_workers: 0
  gpu_worker:
    resources: {CPU: 16, GPU: 4, memory: 137438953472}
    min_workers: 1
    max_workers: 3
  cpu_worker:
    resources: {CPU: 32}
    min_workers: 0
    max_workers: 4
"""


@pytest.mark.parametrize(
    ("spec", "memory"),
    [
        ({"node_config": {"InstanceType": "g5.12xlarge"}}, 24.0),
        ({"node_config": {"InstanceType": "p4de.24xlarge"}}, 80.0),
        ({"node_config": {"InstanceType": "p4d.24xlarge"}}, 40.0),
        ({"node_config": {"InstanceType": "g4dn.xlarge"}}, 16.0),
        ({"node_config": {"machineType": "a2-ultragpu-1g"}}, 80.0),
        ({"node_config": {"machineType": "g2-standard-8"}}, 24.0),
        (
            {
                "node_config": {
                    "machineType": "n1-standard-8",
                    "guestAccelerators": [{"acceleratorType": "projects/p/nvidia-tesla-v100"}],
                }
            },
            16.0,
        ),
        ({"resources": {"GPU": 1, "accelerator_type:H100": 1}}, 80.0),
        ({"node_config": {"InstanceType": "m5.2xlarge"}}, None),
        ({"resources": {"GPU": 1}}, None),
    ],
)
def test_gpu_memory_of_a_cluster_node_type(spec, memory):
    assert node_type_gpu_memory_gb(spec) == memory


def test_cluster_yaml_nodes(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER_YAML)
    shape = ClusterShape.from_cluster_yaml(path)
    names = [n.name for n in shape.nodes]
    # The head, 3 GPU workers, then the top-level max_workers (5) leaves 2 CPU workers.
    assert names == [
        "head (head)",
        "gpu_worker[0]",
        "gpu_worker[1]",
        "gpu_worker[2]",
        "cpu_worker[0]",
        "cpu_worker[1]",
    ]
    assert shape.gpus == 12 and shape.cpus == 4 + 3 * 16 + 2 * 32
    assert shape.nodes[1].memory_gb == 128 and math.isinf(shape.nodes[-1].memory_gb)
    assert shape.gpu_memory_gb is None and any("16 GB assumed" in n for n in shape.notes)
    smallest = ClusterShape.from_cluster_yaml(path, workers="min", gpu_memory_gb=24)
    assert [n.name for n in smallest.nodes] == ["head (head)", "gpu_worker[0]"]
    assert smallest.gpu_memory_gb == 24


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cluster_name: x\n", "available_node_types"),
        ("[1, 2]\n", "a YAML mapping"),
        ("available_node_types: {a: {resources: {CPU: 2}}}\nhead_node_type: b\n", "head_node_type"),
        ("available_node_types: {a: {min_workers: 1}}\n", r"available_node_types\.a\.resources"),
        ("available_node_types: {a: {resources: {GPU: 1}}}\n", r"resources\.CPU"),
        ("available_node_types: {a: {resources: {CPU: -2}}}\n", r"resources\.CPU"),
        (
            "available_node_types: {a: {resources: {CPU: 2}, min_workers: 3, max_workers: 1}}\n",
            "below min_workers",
        ),
        ("available_node_types: {a: {resources: {CPU: 2}, max_workers: x}}\n", "max_workers"),
        ("available_node_types: [\n", "invalid YAML"),
        (
            "available_node_types:\n  a: {resources: {CPU: 2}}\n  a: {resources: {CPU: 8}}\n",
            r"duplicate key 'a' \(first on line 2, again on line 3",
        ),
    ],
)
def test_cluster_yaml_errors_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudyError, match=match) as error:
        ClusterShape.from_cluster_yaml(path)
    assert str(path) in str(error.value)


def test_missing_cluster_file(tmp_path):
    with pytest.raises(StudyError, match="no such cluster file"):
        ClusterShape.from_cluster_yaml(tmp_path / "missing.yaml")
