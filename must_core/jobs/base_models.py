"""Turn an API ``base_model`` object into a local :class:`BaseModelSpec` (fetching its URIs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from must_core.datasets.fetch import fetch_file
from must_core.datasets.uris import check_local_dir
from must_core.ml.config import BaseModelSpec
from must_core.settings import Settings
from must_core.storage.factory import make_s3_client_from_settings


def resolve_base_model(bm: dict[str, Any], dest: Path, settings: Settings) -> BaseModelSpec:
    """Fetch ``config_uri``/``checkpoint_uri`` (file://, s3://, https://, under the dataset policy)
    into ``dest`` and return the engine's spec. Registry tags are left to open_clip (download)."""

    def s3_client() -> Any:
        return make_s3_client_from_settings(settings)

    policy = settings.datasets
    check_local_dir(str(bm.get("arch") or ""), policy)  # re-checked where it is used
    config_path = ckpt_path = None
    if bm.get("config_uri"):
        config_path = fetch_file(bm["config_uri"], dest / "config.json", policy, s3_client)
    if bm.get("checkpoint_uri"):
        name = Path(bm["checkpoint_uri"].split("?", 1)[0]).name or "weights.bin"
        ckpt_path = fetch_file(bm["checkpoint_uri"], dest / name, policy, s3_client)
    return BaseModelSpec(
        arch=bm.get("arch") or "ViT-B-16",
        pretrained=bm.get("pretrained"),
        config=str(config_path) if config_path else None,
        checkpoint=str(ckpt_path) if ckpt_path else None,
        force_quick_gelu=bm.get("force_quick_gelu"),
        allow_random_init=bool(bm.get("allow_random_init", False)),
    )


def base_model_key(bm: dict[str, Any]) -> str:
    """Stable short key of a base-model request (cache folder names)."""
    return hashlib.sha256(json.dumps(bm, sort_keys=True).encode()).hexdigest()[:24]
