"""Checks that a model path names something loadable, before anything loads or any folder is claimed."""

from __future__ import annotations

import os

from ..errors import ConfigError


def check_model_path(path: str, key: str, local_files_only: bool):
    """The Hugging Face config at ``path`` (a model folder or a hub id); a :class:`ConfigError` naming ``key``
    when there is none to read: a missing folder, a folder without ``config.json``, a file, a config that
    transformers cannot parse (an unknown ``model_type``, broken JSON), or a hub id that cannot be fetched."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(key, f"{path} is a folder without config.json: not a Hugging Face model folder")
        what = f"{os.path.join(path, 'config.json')} cannot be read"
    elif os.path.exists(path):
        raise ConfigError(key, f"{path} is a file; expected a model folder (with config.json) or a hub id")
    elif path.startswith((os.sep, ".", "~")) or path.count("/") > 1:
        raise ConfigError(key, f"{path}: no such folder")
    else:
        offline = " (offline: HF_HUB_OFFLINE or local_files_only is set)" if (
            local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1") else ""
        what = f"{path!r} is neither a local folder nor a loadable hub model{offline}"
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(key, f"{what}: {str(error).splitlines()[0]}") from None
