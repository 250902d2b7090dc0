"""The methods' pretrained parts made offline: EfficientAD's distilled teacher, DSR's general
VQ-VAE, texture folders, MMR's ViT from a timm file; their metadata, the rows' ``parts`` column,
studies sweeping over them and the ``sweep parts`` commands. Tiny sizes throughout (32-64 px, a
few dozen steps)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from toy_defects import batches, toy_set
from typer.testing import CliRunner

import models
from data.errors import DatasetError
from data.textures import SKIMAGE_TEXTURES, make_texture_folder
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.components.pdn import load_pdn_weights, patch_description_network
from models.dsr import VQ_KIND, train_general_vq
from models.errors import ModelError
from models.parts import (
    FolderImages,
    describe_part,
    list_images,
    part_fingerprint,
    read_part,
    save_part,
)
from models.teacher_distillation import (
    TEACHER_KIND,
    PatchTarget,
    distill_teacher,
    pool_channels,
)
from sweep.cli import app
from sweep.errors import EXIT_BAD_INPUT, StudyError
from sweep.run.runner import study_schema
from sweep.run.study import check_hyperparameters, config_hash, expand_trials, study_from_dict
from sweep.run.trainable import TrialContext, run_trial
from tests.conftest import tiny_study

DSR_TINY = {
    "hidden_channels": 8,
    "residual_channels": 4,
    "n_residual_layers": 1,
    "embedding_dim": 8,
    "num_embeddings": 16,
}
"""DSR's VQ-VAE sizes for the tests (``models.tiny``'s)."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve 64 px crops of real photographs (skimage's, no download)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("brick", "grass", "gravel", "coffee"):
        image = np.asarray(getattr(skimage.data, name)())
        for i in range(3):
            top = int(rng.integers(0, image.shape[0] - 64))
            left = int(rng.integers(0, image.shape[1] - 64))
            crop = image[top : top + 64, left : left + 64]
            cv2.imwrite(str(root / f"{name}_{i}.png"), crop[:, :, ::-1] if crop.ndim == 3 else crop)
    return root


@pytest.fixture(scope="module")
def teacher(photos, tmp_path_factory):
    """A small teacher distilled from packaged Lite0 for 40 steps at 32 px, saved."""
    torch.manual_seed(123)  # the distillation must not depend on the global generator
    distilled = distill_teacher(
        photos, image_size=64, steps=40, batch_size=4, lr=1e-3, norm_images=8, seed=0
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    distilled.save(path)
    return distilled, path


def test_distillation_reduces_the_loss(photos, teacher):
    distilled, _ = teacher
    assert len(distilled.losses) == 40
    assert np.mean(distilled.losses[-10:]) < np.mean(distilled.losses[:10])
    # On every image of the folder: the distilled PDN against a random one of the same layout.
    # The target has unit variance per channel, so a PDN that learned nothing scores about 1.
    files = list_images(photos, "test")
    backbone_input, teacher_input = FolderImages(files, (128, 64), 0).batch(range(len(files)))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    target_net = PatchTarget("tf_efficientnet_lite0", ("layer2", "layer3"), 384)
    trained = patch_description_network("small", 384, padding=True)
    load_pdn_weights(trained, distilled.state, "distilled")
    torch.manual_seed(0)
    random = patch_description_network("small", 384, padding=True)
    with torch.no_grad():
        target = target_net((backbone_input - mean) / std)
        target = (target - distilled.target_mean) / distilled.target_std
        losses = [
            F.mse_loss(network((teacher_input - mean) / std), target).item()
            for network in (trained, random)
        ]
    assert losses[1] > 0.9
    assert losses[0] < 0.85 * losses[1]


def test_distillation_is_seeded(photos):
    def run(seed: int):
        return distill_teacher(
            photos, image_size=32, steps=2, batch_size=2, norm_images=2, seed=seed
        )

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(again.state[k], v) for k, v in first.state.items())
    assert again.losses == first.losses
    assert not torch.equal(other.state["0.weight"], first.state["0.weight"])


def test_the_target_is_patchcore_features_on_the_teachers_grid():
    target = PatchTarget("tf_efficientnet_lite0", ("layer2", "layer3"), 384, pretrained=False)
    assert target.stride == 8
    # The backbone reads twice the teacher's input, as the paper's 512 px for 256 px.
    features = target(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 384, 8, 8)
    # Channel pooling: neighbouring channels averaged when shrinking, repeated when growing.
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert pool_channels(x, 2).flatten().tolist() == [0.5, 2.5]
    assert pool_channels(x, 8).flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_the_saved_teacher_loads_into_efficient_ad_with_its_metadata(teacher):
    distilled, path = teacher
    metadata = read_part(path)
    assert metadata == json.loads(json.dumps(distilled.metadata))
    assert metadata["kind"] == TEACHER_KIND
    assert metadata["backbone"] == "tf_efficientnet_lite0"
    assert metadata["backbone_weights"].startswith("weights efficientnet-lite0")
    assert (metadata["steps"], metadata["seed"], metadata["image_size"]) == (40, 0, 64)
    assert metadata["n_images"] == 12 and metadata["model_size"] == "small"
    assert metadata["final_loss"] == pytest.approx(np.mean(distilled.losses[-4:]))

    loaded = models.create("efficient_ad", seed=0, teacher_weights=str(path))
    random = models.create("efficient_ad", seed=0)
    for key, value in distilled.state.items():
        assert torch.equal(loaded.teacher.state_dict()[key], value)
    assert not torch.equal(loaded.teacher[0].weight, random.teacher[0].weight)
    parts = loaded.parts()
    assert parts["penalty"] == "none"
    assert parts["teacher"].startswith("distilled from tf_efficientnet_lite0")
    assert "40 steps" in parts["teacher"] and "teacher.safetensors sha256:" in parts["teacher"]
    assert random.parts()["teacher"] == "random init"


def test_a_part_of_another_kind_is_refused_naming_both(tmp_path, teacher):
    _, path = teacher
    state = {k: torch.zeros(1) for k in ("a",)}
    save_part(state, tmp_path / "codes.safetensors", {"kind": VQ_KIND})
    with pytest.raises(ModelError, match=r"teacher_weights .*codes.safetensors.*'dsr.vq'"):
        models.create("efficient_ad", teacher_weights=str(tmp_path / "codes.safetensors"))
    with pytest.raises(ModelError, match=r"vq_weights .*teacher.safetensors.*efficient_ad"):
        models.create("dsr", **DSR_TINY, vq_weights=str(path))
    # A plain state dict without metadata is named by file and hash.
    plain = tmp_path / "plain.pth"
    torch.save(models.create("efficient_ad").teacher.state_dict(), plain)
    detector = models.create("efficient_ad", teacher_weights=str(plain))
    assert detector.parts()["teacher"] == (
        f"file plain.pth sha256:{part_fingerprint(plain, 'file')[:12]}"
    )


def test_save_part_is_atomic_and_checks_the_path(tmp_path):
    with pytest.raises(ModelError, match="safetensors"):
        save_part({"a": torch.ones(1)}, tmp_path / "x.pt", {"kind": "k"})
    with pytest.raises(ModelError, match="does not exist"):
        save_part({"a": torch.ones(1)}, tmp_path / "no" / "x.safetensors", {"kind": "k"})
    shared = torch.ones(4)
    with pytest.raises(RuntimeError, match="share memory"):  # refused while writing
        save_part({"a": shared, "b": shared}, tmp_path / "x.safetensors", {"kind": "k"})
    assert list(tmp_path.iterdir()) == []
    written = save_part({"a": torch.ones(1)}, tmp_path / "x.safetensors", {"kind": "k"})
    umask = os.umask(0)
    os.umask(umask)
    # Not mkstemp's private 0600: the umask decides, as for any file the user writes.
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- DSR


def test_general_vq_trains_on_a_folder_and_dsr_loads_it(photos, tmp_path):
    vq = train_general_vq(
        photos, image_size=32, steps=30, batch_size=4, lr=2e-3, restart_every=10, **DSR_TINY
    )
    assert np.mean(vq.losses[-5:]) < 0.75 * np.mean(vq.losses[:5])
    path = vq.save(tmp_path / "vq.safetensors")
    assert read_part(path)["kind"] == VQ_KIND and read_part(path)["steps"] == 30

    detector = models.create("dsr", **DSR_TINY, unet_width=4, vq_weights=str(path))
    for key, value in vq.state.items():
        assert torch.equal(detector.state_dict()[key], value)
    stats = detector.fit(batches(toy_set(32, 4, 1).train, 2), epochs=2)
    assert stats["vq_epochs"] == 0  # the loaded VQ-VAE is not trained again
    assert stats["parts"]["codebook"].startswith("general VQ-VAE trained on 12 images")
    assert stats["parts"]["textures"] == "generated"
    own = models.create("dsr", **DSR_TINY, unet_width=4)
    assert own.parts()["codebook"] == "own training images (0.2 of the epochs)"
    with pytest.raises(ModelError, match="wrong shapes"):
        models.create("dsr", **{**DSR_TINY, "embedding_dim": 4}, vq_weights=str(path))


# --------------------------------------------------------------------------- textures


def test_texture_folder_from_an_image_folder(photos, tmp_path):
    out = tmp_path / "textures"
    manifest = make_texture_folder(out, images=photos, tile_size=32, stride=32)
    tiles = sorted(p.name for p in out.glob("*.png"))
    assert len(tiles) == 12 * 4 == manifest["n_tiles"]
    assert set(manifest["files"]) == set(tiles)
    assert cv2.imread(str(out / tiles[0])).shape == (32, 32, 3)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    assert (
        json.loads((out / "manifest.json").read_text())["content_sha256"]
        == (manifest["content_sha256"])
    )
    assert part_fingerprint(out, "folder") == manifest["content_sha256"]
    assert describe_part(out, "folder").startswith("48 texture tiles of 32 px from the images")
    # Seeded: the same call writes the same tiles.
    again = make_texture_folder(tmp_path / "again", images=photos, tile_size=32, stride=32)
    assert again["content_sha256"] == manifest["content_sha256"]
    picked = make_texture_folder(tmp_path / "few", images=photos, tile_size=32, max_per_image=1)
    assert picked["n_tiles"] == 12


def test_texture_folder_is_written_whole_or_not_at_all(photos, tmp_path):
    out = tmp_path / "textures"
    make_texture_folder(out, images=photos, tile_size=32, stride=32)
    with pytest.raises(DatasetError, match="already exists"):
        make_texture_folder(out, images=photos, tile_size=32)
    broken = tmp_path / "broken"
    broken.mkdir()
    cv2.imwrite(str(broken / "a.png"), np.zeros((40, 40, 3), np.uint8))
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"b\.png"):
        make_texture_folder(out, images=broken, tile_size=32, overwrite=True)
    # The failed overwrite left the old folder as it was, and no partial folder behind.
    assert len(list(out.glob("*.png"))) == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "textures"]
    replaced = make_texture_folder(out, images=photos, tile_size=64, overwrite=True)
    assert replaced["n_tiles"] == 12 and len(list(out.glob("*.png"))) == 12
    with pytest.raises(DatasetError, match="missing"):
        make_texture_folder(tmp_path / "t2", images=tmp_path / "missing")
    assert not (tmp_path / "t2").exists()


def test_default_texture_folder_is_skimages_photographs(tmp_path):
    manifest = make_texture_folder(tmp_path / "t", tile_size=256, stride=256)
    assert manifest["sources"] == list(SKIMAGE_TEXTURES)
    assert manifest["source"] == "skimage.data"
    assert manifest["n_tiles"] == 4 * len(SKIMAGE_TEXTURES)  # each photograph is 512 x 512


def test_draem_and_memseg_read_a_texture_folder(photos, tmp_path, random_resnet18_weights):
    out = tmp_path / "textures"
    make_texture_folder(out, images=photos, tile_size=32, stride=32)
    toy = toy_set(32, 2, 1)
    draem = models.create(
        "draem", reconstructive_channels=4, discriminative_channels=4, texture_dir=str(out)
    )
    stats = draem.fit(batches(toy.train, 2), epochs=1)
    assert "notes" not in stats  # no "generated textures" note
    assert stats["parts"]["textures"].startswith("48 texture tiles")
    memseg = models.create(
        "memseg", pretrained=False, weights=random_resnet18_weights, memory_size=2,
        texture_dir=str(out),
    )  # fmt: skip
    stats = memseg.fit(batches(toy.train, 2), epochs=1)
    assert stats["parts"]["textures"] == describe_part(out, "folder")
    generated = models.create("draem", reconstructive_channels=4, discriminative_channels=4)
    assert generated.parts() == {"textures": "generated"}


# --------------------------------------------------------------------------- MMR


def test_mmr_starts_from_a_timm_vit_file_and_says_so(tmp_path, random_resnet18_weights):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    config = {
        "backbone": "resnet18",
        "pretrained": False,
        "weights": random_resnet18_weights,
        "patch_size": 8,
        "vit_embed_dim": 32,
        "vit_depth": 1,
        "vit_heads": 2,
        "warmup_epochs": 0,
    }
    loaded = models.create("mmr", **config, vit_weights=str(path))
    assert torch.equal(loaded.vit.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    toy = toy_set(32, 2, 1)
    stats = loaded.fit(batches(toy.train, 2), epochs=1)
    assert stats["parts"]["vit"].startswith("timm ViT file vit.safetensors sha256:")
    assert any("supervised timm ViT" in note for note in stats["notes"])
    stats = models.create("mmr", **config).fit(batches(toy.train, 2), epochs=1)
    assert stats["parts"] == {"vit": "random init"}
    assert any("random initialisation" in note for note in stats["notes"])


# --------------------------------------------------------------------------- rows and studies


def test_the_row_says_which_teacher_it_used(glue_root, tmp_path, teacher):
    _, path = teacher
    raw = tiny_study(glue_root, tmp_path / "out")
    raw["space"] = {
        "model": "efficient_ad",
        "seed": 0,
        "epochs": 1,
        "efficient_ad.teacher_weights": {"grid": [None, str(path)]},
    }
    study = study_from_dict(raw)
    context = TrialContext(
        study=study, output=str(tmp_path / "out"), run_id="t", schema=study_schema(study)
    )
    trials = expand_trials(study)
    assert len(trials) == 2 and "parts" in context.schema.names
    by_teacher = {
        t.hparams.get("teacher_weights"): json.loads(run_trial(t, context)["parts"]) for t in trials
    }
    assert by_teacher[None] == {"penalty": "none", "teacher": "random init"}
    assert by_teacher[str(path)]["teacher"].startswith("distilled from tf_efficientnet_lite0")


def test_a_study_sweeps_over_parts_and_validation_names_a_missing_one(tmp_path, teacher):
    _, path = teacher
    space = {
        "model": {"grid": ["efficient_ad", "dsr", "draem", "memseg", "mmr"]},
        "efficient_ad.teacher_weights": {"grid": [None, str(path)]},
        "draem.texture_dir": {"grid": [None, str(tmp_path)]},
    }
    study = study_from_dict({"name": "s", "space": space})
    check_hyperparameters(study)
    trials = {
        (t.model, t.hparams.get("teacher_weights"), t.hparams.get("texture_dir")): t
        for t in expand_trials(study)
    }
    assert len(trials) == 7
    # The content of a part is part of the configuration's identity, not only its path.
    distilled, _ = teacher
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    trial = trials[("efficient_ad", str(path), None)]
    moved = dataclasses.replace(trial, hparams={**trial.hparams, "teacher_weights": str(copy)})
    first = config_hash(study, moved)
    assert first != config_hash(study, trial)
    save_part({k: v + 1 for k, v in distilled.state.items()}, copy, distilled.metadata)
    assert config_hash(study, moved) != first

    for key, value in (
        ("efficient_ad.teacher_weights", str(tmp_path / "missing.safetensors")),
        ("dsr.vq_weights", str(tmp_path / "missing_vq.safetensors")),
        ("draem.texture_dir", str(tmp_path / "no_textures")),
        ("memseg.texture_dir", str(tmp_path / "no_textures")),
        ("mmr.vit_weights", str(tmp_path / "no_vit.pth")),
    ):
        broken = study_from_dict({"name": "s", "space": {**space, key: {"grid": [None, value]}}})
        with pytest.raises(StudyError, match=Path(value).name):
            check_hyperparameters(broken)


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_makes_and_shows_parts(photos, tmp_path):
    out = tmp_path / "t.safetensors"
    result = invoke(
        "parts", "teacher", "--images", photos, "--out", out, "--steps", 2,
        "--image-size", 32, "--batch-size", 2, "--norm-images", 2,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = invoke("parts", "show", out)
    assert shown.exit_code == 0
    described = json.loads(shown.stdout)
    assert described["kind"] == TEACHER_KIND and described["steps"] == 2
    assert len(described["sha256"]) == 64
    textures = tmp_path / "tex"
    result = invoke("parts", "textures", "--out", textures, "--images", photos, "--tile-size", 64)
    assert result.exit_code == 0, result.output
    assert json.loads(invoke("parts", "show", textures).stdout)["n_tiles"] == 12
    result = invoke(
        "parts", "dsr-vq", "--images", photos, "--out", tmp_path / "vq.safetensors",
        "--steps", 2, "--image-size", 32, "--batch-size", 2, "--hidden-channels", 8,
        "--residual-channels", 4, "--n-residual-layers", 1, "--embedding-dim", 8,
        "--num-embeddings", 16,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_part(tmp_path / "vq.safetensors")["num_embeddings"] == 16


@pytest.mark.parametrize(
    "args, needle",
    [
        (("teacher", "--images", "{tmp}/missing", "--out", "{tmp}/t.safetensors"), "missing"),
        (("teacher", "--images", "{tmp}/empty", "--out", "{tmp}/t.safetensors"), "empty"),
        (("teacher", "--images", "{photos}", "--out", "{tmp}/t.pt"), "t.pt"),
        (("teacher", "--images", "{photos}", "--out", "{tmp}/no/t.safetensors"), "no"),
        (("teacher", "--images", "{photos}", "--out", "{tmp}/exists.safetensors"), "exists"),
        (("dsr-vq", "--images", "{tmp}/empty", "--out", "{tmp}/v.safetensors"), "empty"),
        (("textures", "--out", "{tmp}/exists.safetensors"), "exists"),
        (("textures", "--out", "{tmp}/t", "--images", "{tmp}/missing"), "missing"),
        (("show", "{tmp}/missing.safetensors"), "missing.safetensors"),
        (("show", "{tmp}/empty"), "manifest"),
        (("show", "{tmp}/exists.safetensors"), "exists.safetensors"),
    ],
)
def test_cli_bad_input_exits_2_naming_the_path(photos, tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists.safetensors").write_bytes(b"not safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke("parts", *(a.format(tmp=tmp_path, photos=photos) for a in args))
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert needle in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_validate_exits_2_naming_a_missing_part(tmp_path):
    study = tmp_path / "study.yaml"
    missing = tmp_path / "teacher_missing.safetensors"
    space = {
        "model": "efficient_ad",
        "efficient_ad.teacher_weights": {"grid": [None, str(missing)]},
    }
    study.write_text(json.dumps({"name": "s", "space": space}))
    result = invoke("validate", study)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "teacher_missing.safetensors" in result.output
