"""ds_kdqat.errors: the errors keep their fields through pickling (worker processes send them to their parent)."""

from __future__ import annotations

import pickle

import pytest

from ds_kdqat.data.embedded import EmbeddedDataMissing
from ds_kdqat.errors import ConfigError, DataError, OutputFolderError


@pytest.mark.parametrize("error, field", [
    (ConfigError("kdqat.quant.groups[2].bits", "got 9, expected 1-8"), "path"),
    (OutputFolderError("output_dir", "holds files ds-kdqat did not write"), "path"),
    (DataError("train.tsv:17", "2 columns, expected 3"), "source"),
    (EmbeddedDataMissing("rt-polarity.csv", "run scripts/fetch_embedded_data.sh"), "source"),
])
def test_errors_pickle_with_their_fields(error, field):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert getattr(back, field) == getattr(error, field) and back.message == error.message
    assert str(back) == str(error)


def test_config_error_without_path_keeps_its_message():
    back = pickle.loads(pickle.dumps(ConfigError("", "nothing to do")))
    assert str(back) == "nothing to do" and back.path == ""
