"""The tensor cache, the feature extractor's use of it, and PatchCore's resumable coreset.

What matters: enabling the cache never changes a result (hits are bit-identical, anything the
features depend on changes the key), the directory stays bounded and survives corrupt files and
concurrent writers, and a resumed coreset is the fresh one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import models
import models.cache
from models.backbones import FeatureExtractor
from models.cache import TensorCache, active_cache, make_key, use_cache
from models.components.coreset import GreedyCoreset, greedy_coreset, naive_greedy_coreset

MB = 1 << 20


def images(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=False)


@pytest.fixture
def cache(tmp_path) -> TensorCache:
    return TensorCache(tmp_path / "cache", max_bytes=64 * MB)


def entry_files(cache: TensorCache) -> list[Path]:
    return sorted(cache.directory.glob("??/*.safetensors"))


# ----------------------------------------------------------------------------- keys


def test_make_key_separates_parts_types_and_tensor_metadata():
    assert make_key("ab", "c") != make_key("a", "bc")
    assert make_key(1) != make_key(1.0) != make_key("1") != make_key(True)
    assert make_key((1, 2)) != make_key(1, 2)
    assert make_key(None) != make_key()
    ones = torch.ones(4)
    assert make_key(ones) == make_key(ones.clone())
    assert make_key(ones) != make_key(ones.double())
    assert make_key(ones) != make_key(ones.view(2, 2))
    assert make_key(torch.zeros(4)) != make_key(torch.tensor([0.0, 0.0, 0.0, -0.0]))
    # Logical content, not layout: a transposed copy made contiguous hashes the same.
    matrix = torch.arange(6.0).view(2, 3)
    assert make_key(matrix.t()) == make_key(matrix.t().contiguous())
    assert make_key(torch.ones(3, dtype=torch.bfloat16)) != make_key(torch.ones(3))
    with pytest.raises(TypeError, match="object"):
        make_key(object())


# ----------------------------------------------------------------------------- the store


def test_put_get_round_trip_keeps_values_dtypes_and_layout(cache):
    base = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    tensors = {
        "permuted": base[:, 1:].permute(0, 2, 1),  # a slice's view: gaps and an offset
        "half": base.half(),
        "ints": torch.arange(10),
        "flags": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "expanded": torch.ones(3, 1).expand(3, 4),  # overlapping: comes back contiguous
    }
    key = make_key("round trip")
    assert cache.get(key) is None
    assert cache.put(key, tensors)
    back = cache.get(key)
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype
        assert torch.equal(back[name], tensor), name
    assert back["permuted"].stride() == tensors["permuted"].stride()
    assert back["permuted"].storage_offset() == tensors["permuted"].storage_offset()
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["writes"]) == (1, 1, 1)
    assert stats["bytes_read"] == stats["bytes_written"] == cache.size_bytes() > 0


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        TensorCache(tmp_path, max_bytes=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file"):
        TensorCache(tmp_path / "file" / "cache", max_bytes=MB)
    with pytest.raises(ValueError, match="hex digest"):
        TensorCache(tmp_path, max_bytes=MB).get("../../etc/passwd")


def test_eviction_keeps_the_bound_and_drops_the_least_recently_used(tmp_path):
    entry = {"x": torch.zeros(64 * 1024)}  # 256 KiB of data, a little more on disk
    cache = TensorCache(tmp_path, max_bytes=int(3.5 * 256 * 1024))
    keys = [make_key("entry", i) for i in range(5)]
    for key in keys[:3]:
        cache.put(key, entry)
    assert cache.get(keys[0]) is not None  # 0 is now more recent than 1 and 2
    cache.put(keys[3], entry)
    assert cache.size_bytes() <= cache.max_bytes
    assert cache.get(keys[1]) is None
    assert all(cache.get(k) is not None for k in (keys[2], keys[0], keys[3]))
    cache.put(keys[4], entry)  # 2 is the least recently used now
    assert cache.get(keys[2]) is None
    assert cache.size_bytes() <= cache.max_bytes
    assert len(entry_files(cache)) == 3
    assert cache.stats()["evictions"] == 2
    # An entry larger than the whole bound is not written (and evicts nothing).
    assert not cache.put(make_key("huge"), {"x": torch.zeros(MB)})
    assert cache.stats()["too_large"] == 1 and len(entry_files(cache)) == 3


@pytest.mark.parametrize("damage", ["truncate", "flip a data byte", "garbage", "empty"])
def test_a_corrupt_entry_is_a_miss_and_is_removed(cache, damage):
    key = make_key("corrupt", damage)
    cache.put(key, {"x": torch.arange(1000.0)})
    path = cache.path(key)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 100]
    elif damage == "flip a data byte":
        blob[-5] ^= 0xFF
    elif damage == "garbage":
        blob = bytearray(b"\x00\x01" * 300)
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    assert cache.get(key) is None
    assert not path.exists()
    assert cache.stats()["corrupt"] == 1
    # ... and the next write repairs it.
    cache.put(key, {"x": torch.arange(1000.0)})
    assert torch.equal(cache.get(key)["x"], torch.arange(1000.0))


def test_an_entry_under_another_key_is_not_returned(cache):
    first, second = make_key("first"), make_key("second")
    cache.put(first, {"x": torch.ones(3)})
    cache.path(second).parent.mkdir(exist_ok=True)
    os.replace(cache.path(first), cache.path(second))
    assert cache.get(second) is None


def test_files_vanishing_under_the_cache_are_misses(cache):
    keys = [make_key("vanish", i) for i in range(3)]
    for key in keys:
        cache.put(key, {"x": torch.ones(10)})
    for path in entry_files(cache):
        path.unlink()  # another process evicted them
    assert all(cache.get(key) is None for key in keys)
    cache.put(make_key("after"), {"x": torch.ones(10)})  # the scan tolerates the gaps
    assert cache.size_bytes() > 0


def _write_many(cache: TensorCache, worker: int, rounds: int) -> None:
    for i in range(rounds):
        # Everyone writes the shared key, and keys of its own that push eviction.
        cache.put(make_key("shared"), {"x": torch.arange(50_000.0)})
        cache.put(make_key("own", worker, i), {"x": torch.full((100_000,), float(i))})
        got = cache.get(make_key("shared"))
        assert got is None or torch.equal(got["x"], torch.arange(50_000.0))


# A writer process loads models/cache.py alone: importing the models package (every detector,
# timm) would take most of this test's time.
_WRITER_PROCESS = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("cache", sys.argv[1])
cache = sys.modules["cache"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)
store = cache.TensorCache(sys.argv[2], max_bytes=int(sys.argv[3]))
for i in range(int(sys.argv[5])):
    store.put(cache.make_key("shared"), {"x": torch.arange(50_000.0)})
    store.put(cache.make_key("own", int(sys.argv[4]), i), {"x": torch.full((100_000,), float(i))})
    got = store.get(cache.make_key("shared"))
    assert got is None or torch.equal(got["x"], torch.arange(50_000.0))
"""


def test_concurrent_writers_leave_valid_entries_and_no_temporary_files(tmp_path):
    directory, bound, rounds = tmp_path / "shared", 6 * MB, 15
    source = Path(models.cache.__file__)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER_PROCESS,
                source,
                directory,
                str(bound),
                str(w),
                str(rounds),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for w in range(2)
    ]
    threads = [
        threading.Thread(target=_write_many, args=(TensorCache(directory, bound), 10 + w, rounds))
        for w in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    cache = TensorCache(directory, max_bytes=bound)
    assert not list(directory.glob("**/*.tmp"))
    # Each writer may have finished a write after another's scan: at most one entry each over.
    assert cache.size_bytes() <= bound + 4 * 400 * 1024
    for path in entry_files(cache):
        assert cache.get(path.name.removesuffix(".safetensors")) is not None
    assert torch.equal(cache.get(make_key("shared"))["x"], torch.arange(50_000.0))
    assert cache.stats()["corrupt"] == 0


def test_use_cache_is_scoped_and_nests(cache, tmp_path):
    assert active_cache() is None
    other = TensorCache(tmp_path / "other", max_bytes=MB)
    with use_cache(cache):
        assert active_cache() is cache
        with use_cache(None):
            assert active_cache() is None
        with use_cache(other):
            assert active_cache() is other
        assert active_cache() is cache
    assert active_cache() is None


# ----------------------------------------------------------------------------- the extractor


def test_a_cache_hit_gives_features_identical_to_a_fresh_forward(extractor, cache):
    batch = images()
    fresh = extractor(batch)
    with use_cache(cache):
        miss = extractor(batch)
        hit = extractor(batch)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1
    assert list(hit) == list(fresh) == ["layer2", "layer3"]
    for layer in fresh:
        assert torch.equal(miss[layer], fresh[layer])
        assert torch.equal(hit[layer], fresh[layer])
        assert hit[layer].stride() == fresh[layer].stride()


def test_a_hit_skips_the_backbone(extractor, cache, monkeypatch):
    batch = images(seed=1)
    with use_cache(cache):
        extractor(batch)
        monkeypatch.setattr(extractor, "_compute", lambda *a: pytest.fail("recomputed"))
        extractor(batch)


def test_anything_the_features_depend_on_changes_the_key(extractor, cache):
    batch = images(seed=2)
    key = extractor.feature_cache_key(batch)
    assert extractor.feature_cache_key(batch.clone()) == key
    changed = batch.clone()
    changed[1, 2, 3, 4] += 1e-6
    other_weights = FeatureExtractor("resnet18", ["layer2", "layer3"], pretrained=False, seed=1)
    other_layers = FeatureExtractor("resnet18", ["layer1", "layer3"], pretrained=False)
    assert extractor.feature_cache_key(changed) != key
    assert extractor.feature_cache_key(batch.double()) != key
    assert extractor.feature_cache_key(batch.contiguous(memory_format=torch.channels_last)) != key
    assert other_weights.feature_cache_key(batch) != key
    assert other_layers.feature_cache_key(batch) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert extractor.feature_cache_key(batch) != key
    finally:
        torch.set_num_threads(threads)
    # Different weights or layers miss in the cache itself too.
    with use_cache(cache):
        extractor(batch)
        other_weights(batch)
        other_layers(batch)
        extractor(changed)
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 4


def test_the_weights_fingerprint_follows_in_place_changes(cache):
    extractor = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    batch = images(seed=3)
    key = extractor.feature_cache_key(batch)
    assert extractor.feature_cache_key(batch) == key  # memoised: unchanged weights
    other = FeatureExtractor("resnet18", ["layer2"], pretrained=False, seed=5)
    extractor.load_state_dict(other.state_dict())
    assert extractor.feature_cache_key(batch) == other.feature_cache_key(batch) != key
    with torch.no_grad():
        next(extractor.parameters()).mul_(2.0)
    assert extractor.feature_cache_key(batch) != other.feature_cache_key(batch)
    with use_cache(cache):
        before = extractor(batch)
        with torch.no_grad():
            extractor.model.layer2[0].bn1.running_var.add_(1.0)
        after = extractor(batch)
    assert cache.stats()["misses"] == 2
    assert not torch.equal(before["layer2"], after["layer2"])


def test_a_trainable_extractor_never_caches(cache):
    trainable = FeatureExtractor("resnet18", ["layer2"], pretrained=False, requires_grad=True)
    trainable.eval()
    frozen = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    with use_cache(cache):
        with torch.no_grad():
            trainable(images())
            trainable(images())
        # Nor does a frozen one asked for gradients with respect to its input, or hooked.
        frozen(images().requires_grad_())
        handle = frozen.model.layer1.register_forward_hook(lambda *args: None)
        frozen(images())
        handle.remove()
    assert cache.stats()["hits"] == cache.stats()["misses"] == 0
    assert entry_files(cache) == []


def test_aliased_layers_share_one_stored_tensor(cache):
    # On resnet18, layer4 is the native "layer4" under two names.
    extractor = FeatureExtractor("resnet18", ["layer3", "layer4"], pretrained=False)
    batch = images(seed=4)
    fresh = extractor(batch)
    with use_cache(cache):
        extractor(batch)
        hit = extractor(batch)
    assert all(torch.equal(hit[k], fresh[k]) for k in fresh)


def test_transformer_tokens_come_back_with_their_layout(cache):
    extractor = FeatureExtractor("vit_small_patch14_dinov2", ["blocks.2"], pretrained=False)
    batch = images(n=1, size=28)
    fresh = extractor(batch, norm=True)
    with use_cache(cache):
        extractor(batch, norm=True)
        hit = extractor(batch, norm=True)
        assert extractor.feature_cache_key(batch) != extractor.feature_cache_key(batch, norm=True)
    assert cache.stats()["hits"] == 1
    assert torch.equal(hit["blocks.2"], fresh["blocks.2"])
    assert hit["blocks.2"].stride() == fresh["blocks.2"].stride()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_device_is_part_of_the_key_and_hits_land_on_the_input_device(cache):
    extractor = FeatureExtractor("resnet18", ["layer2"], pretrained=False)
    batch = images(seed=6)
    on_gpu = extractor.cuda()
    gpu_key = on_gpu.feature_cache_key(batch.cuda())
    assert gpu_key != on_gpu.cpu().feature_cache_key(batch)
    extractor.cuda()
    with use_cache(cache):
        fresh = extractor(batch.cuda())
        hit = extractor(batch.cuda())
    assert cache.stats()["hits"] == 1
    assert hit["layer2"].device.type == "cuda"
    assert torch.equal(hit["layer2"], fresh["layer2"])


# ----------------------------------------------------------------------------- the coreset


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(8, dim, generator=generator)
    labels = torch.randint(8, (n,), generator=generator)
    return torch.relu(centres[labels] + torch.randn(n, dim, generator=generator))


@pytest.mark.parametrize("projection_dim", [24, None])
def test_coreset_prefix_and_resume_equal_a_fresh_selection(projection_dim):
    features = clustered(1500, 48, seed=0)

    def generator():
        return torch.Generator().manual_seed(7)

    options = {"projection_dim": projection_dim}
    fresh = {
        n: naive_greedy_coreset(features, n, generator=generator(), **options) for n in (40, 150)
    }
    run = GreedyCoreset(features, generator=generator(), **options)
    assert torch.equal(run.select(40), fresh[40])
    assert len(run) == 40
    assert torch.equal(run.select(150), fresh[150])  # extended in place
    assert torch.equal(run.select(40), fresh[40])  # a prefix, nothing recomputed
    assert len(run) == 150
    # Saved after 40 centres, resumed elsewhere to 150.
    short = GreedyCoreset(features, generator=generator(), **options)
    short.select(40)
    state = short.state_dict()
    resumed = GreedyCoreset(features, generator=generator(), state=state, **options)
    assert torch.equal(resumed.select(150), fresh[150])
    assert torch.equal(state["selected"], fresh[40])  # the saved state is a copy
    assert torch.equal(greedy_coreset(features, 0.1, generator=generator(), **options), fresh[150])


def test_a_state_from_another_run_is_refused():
    features = clustered(500, 16, seed=1)
    run = GreedyCoreset(features, generator=torch.Generator().manual_seed(0))
    run.select(20)
    state = run.state_dict()
    with pytest.raises(ValueError, match="another point"):
        GreedyCoreset(features, generator=torch.Generator().manual_seed(1), state=state)
    with pytest.raises(ValueError, match="400-vectors"):
        GreedyCoreset(features[:400], generator=torch.Generator().manual_seed(0), state=state)
    with pytest.raises(ValueError, match="needs selected"):
        GreedyCoreset(features, state={"selected": state["selected"]})


def test_patchcore_with_the_cache_gives_the_same_memory_bank_and_scores(cache):
    train = [images(n=4, size=64, seed=s) for s in range(2)]
    test = images(n=3, size=64, seed=9)

    def fitted(ratio: float, use: TensorCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        detector = models.create(
            "patchcore", backbone="resnet18", coreset_ratio=ratio, pretrained=False
        )
        with use_cache(use):
            detector.fit(train)
            prediction = detector.predict(test)
        return detector.memory_bank, prediction.score

    for ratio in (0.05, 0.2, 0.1, 0.2):  # miss, resume, prefix, prefix
        bank, score = fitted(ratio, None)
        cached_bank, cached_score = fitted(ratio, cache)
        assert torch.equal(cached_bank, bank), ratio
        assert torch.equal(cached_score, score), ratio
    stats = cache.stats()
    # Train batches and the test batch hit after the first fit; the coreset misses once, then
    # finds a shorter run (resumed) and then longer ones (prefixes).
    assert stats["hits"] == 3 * 3 + 3 and stats["misses"] == 3 + 1
    coreset_entries = [p for p in entry_files(cache) if p.stat().st_size < 40_000]
    assert len(coreset_entries) == 1
