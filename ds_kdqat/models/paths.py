"""Checks that a model path names something loadable, before anything loads or any folder is claimed."""

from __future__ import annotations

import os

from ..errors import ConfigError


def check_model_path(path: str, key: str, local_files_only: bool) -> None:
    """Stop with a :class:`ConfigError` naming ``key`` unless ``path`` is a model folder or a hub id whose
    config can be read (a local folder needs ``config.json``)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(key, f"{path} is a folder without config.json: not a Hugging Face model folder")
        return
    if os.path.exists(path):
        raise ConfigError(key, f"{path} is a file; expected a model folder (with config.json) or a hub id")
    looks_local = path.startswith((os.sep, ".", "~")) or path.count("/") > 1
    if looks_local:
        raise ConfigError(key, f"{path}: no such folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        offline = " (offline: HF_HUB_OFFLINE or local_files_only is set)" if (
            local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1") else ""
        raise ConfigError(key, f"{path!r} is neither a local folder nor a loadable hub model{offline}: "
                          f"{str(error).splitlines()[0]}") from None
