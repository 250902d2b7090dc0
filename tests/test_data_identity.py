"""What a study's data is: the bit depth of 16-bit files (part of a trial's identity only when
set), the data set's content fingerprint (an edited data set is not taken for the one an
output's rows came from) and the study an output holds (one output, one study)."""

from __future__ import annotations

from pathlib import Path

from sweep.run.study import config_hash, expand_trials, study_from_dict
from tests.conftest import tiny_study


def _study(tmp_path: Path, **dataset):
    # Fixed paths: the data set's root is part of the config hash.
    raw = tiny_study(Path("/tmp/x/glue"), Path("/tmp/x/out"))
    raw["dataset"].update(dataset)
    return study_from_dict(raw)


def test_bit_depth_enters_the_config_hash_only_when_set(tmp_path):
    default = _study(tmp_path)
    trial = expand_trials(default)[0]
    auto = _study(tmp_path, bit_depth="auto")
    twelve = _study(tmp_path, bit_depth=12)
    assert default.dataset.bit_depth == "auto"
    assert "bit_depth" not in default.dataset.identity()
    # The id every existing output holds for this configuration (before the key existed).
    assert config_hash(default, trial) == config_hash(auto, trial) == "92df86efc58c569d"
    assert config_hash(twelve, trial) != config_hash(default, trial)
    assert twelve.dataset.loader_arguments(64)["bit_depth"] == 12
    assert "bit_depth" not in default.dataset.loader_arguments(64)
