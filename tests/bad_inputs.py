"""Hostile request values that a database or a JSON encoder would choke on, shared by the SQLite
(unit) and PostgreSQL (integration) tests: each must be a 422 that commits nothing."""

from __future__ import annotations

import json
from typing import Any

NAN = float("nan")
BAD_JOB_PATCHES: list[dict[str, Any]] = [
    {"class_names": ["ok", "bad\ud800"]},
    {"class_names": ["nul\x00", "b"]},
    {"templates": ["a {} \x00"]},
    {"templates": ["a {} \udfff"]},
    {"dataset_uri": "file:///data/\ud800"},
    {"eval_dataset_uri": "s3://bucket/" + "x" * 5000},
    {"base_model": {"arch": "\ud800"}},
    {"base_model": {"arch": "must-tiny", "pretrained": "\x00"}},
    {"params": {"preset": "a\x00"}},
    {"params": {"seed": 2**63}},
    {"params": {"seed": -1}},
    {"params": {"seed": False}},  # a boolean is not a number (strict params)
    {"params": {"epochs": "10"}},
    {"params": {"min_steps": 10**30}},
    {"params": {"lr": NAN}},
    {"params": {"k\ud800": 1}},
    {"params": {"deep": json.loads("[" * 40 + "]" * 40)}},
    {"name": "00000000-0000-x"},  # starts like a UUID: the schema's `not` pattern refuses it
]
BAD_LIST_QUERIES = [{"offset": str(2**63)}, {"offset": str(10**30)}, {"limit": str(10**30)}]


def raw_json(body: dict[str, Any]) -> bytes:
    """JSON as a hostile client sends it: lone surrogates escaped, NaN as a bare literal."""
    return json.dumps(body).encode()
