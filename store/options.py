"""Defaults shared by the configs and command lines (light: no numpy), and parsing
``--storage-options``."""

from __future__ import annotations

import json

from sasa.errors import SasaError

#: Kinds of special tokens excluded from statistics and, by default, from training and eval
#: batches (``sasa.store.masks``; TrainConfig, EvalConfig and the scans default to it).
DEFAULT_EXCLUDE = ("bos", "pad")


def parse_storage_options(text: str | None) -> dict | None:
    """JSON object text -> dict. The options may hold credentials: never log or store them."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise SasaError(f"--storage-options is not valid JSON ({err.msg} at char {err.pos}); "
                        f"pass an object like '{{\"endpoint_url\": \"http://host:9000\"}}'") from None
    if not isinstance(options, dict):
        raise SasaError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options
