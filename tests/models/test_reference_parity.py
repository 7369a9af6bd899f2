"""merv's encoders give the features of the reference implementations (see tests/reference/parity.py): max abs
difference <= 1e-5 in float32, on small random models saved in the real checkpoints' layouts."""

import pytest

from tests.reference import parity
from tests.reference.venvs import reference_python

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def languagebind_python():
    return reference_python("languagebind")


def test_languagebind_matches_languagebinds_own_code_at_8_and_16_frames(languagebind_python, tmp_path):
    """The folder is saved by LanguageBind's code with transformers 4.x (``pytorch_model.bin`` with the position_ids
    buffer); 16 frames run through the 8-frame model as two clips of 8, as the original MERV runs them."""
    diffs = parity.languagebind(languagebind_python, tmp_path)
    assert (tmp_path / "LanguageBind_Video_small" / "pytorch_model.bin").is_file()
    assert all(d <= TOLERANCE for d in diffs.values()), diffs


def test_vivit_matches_transformers_vivitmodel(tmp_path):
    assert parity.vivit(tmp_path) <= TOLERANCE


@pytest.mark.parametrize("encoder", ["dinov2", "siglip"])
def test_timm_encoders_match_get_intermediate_layers(encoder, tmp_path):
    assert getattr(parity, encoder)(tmp_path) <= TOLERANCE


def test_hiera_matches_the_hiera_package_as_the_original_takes_it(tmp_path):
    assert parity.hiera(tmp_path) <= TOLERANCE
