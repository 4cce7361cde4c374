"""The public Python client of a must server (the CLI's ``must jobs|models|classify`` use it too).

Example::

    from must_core.client import MustClient

    with MustClient("http://127.0.0.1:8000", api_key="...") as must:
        job = must.submit("s3://photos/shelf/", ["cereal", "pasta", "rice"], name="shelf")
        job = must.wait(job.id, on_progress=lambda j: print(j.progress.step, j.progress.eta_seconds))
        print(must.classify("shelf:latest", ["a.jpg"]))
        must.download("shelf:latest", "shelf.onnx", format="onnx")  # digest-checked
        preds = must.wait(must.predict("shelf:latest", "s3://photos/unlabeled/").id)
        must.download_predictions(preds.id, "labels.csv", format="csv")

Every non-2xx answer raises :class:`ClientError` with the server's problem ``code``; a server that
cannot be reached raises :class:`Unreachable`.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from must_core.errors import MustError
from must_core.jobs.schemas import JobRead, ModelRead

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ModelFormat = Literal["safetensors", "onnx", "safetensors_ema"]


class ClientError(MustError):
    """The server refused a request (``code`` is its problem+json code)."""

    code = "client_error"


class Unreachable(MustError):
    code = "server_unreachable"


class MustClient:
    """A typed client of the ``/v1`` API (jobs, models, classify, predictions, downloads)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> MustClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ---- transport --------------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; JSON body of the answer (None for 204). Raises ClientError/Unreachable."""
        r = self._send(method, path, **kwargs)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        _raise_for_problem(r)
        return r

    # ---- jobs -------------------------------------------------------------------------------------
    def submit(
        self,
        dataset_uri: str,
        class_names: Sequence[str],
        *,
        base_model: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        name: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> JobRead:
        """Submit an adaptation job (``fields``: templates, eval_dataset_uri, tags, ...)."""
        body: dict[str, Any] = {"dataset_uri": dataset_uri, "class_names": list(class_names)}
        for key, value in (
            ("base_model", base_model),
            ("params", params),
            ("name", name),
            ("callback_url", callback_url),
        ):
            if value is not None:
                body[key] = value
        body.update(fields)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobRead.model_validate(self.request("POST", "/v1/jobs", json=body, headers=headers))

    def job(self, job_id: str | uuid.UUID) -> JobRead:
        return JobRead.model_validate(self.request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str | uuid.UUID) -> JobRead:
        return JobRead.model_validate(self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def resume(self, job_id: str | uuid.UUID) -> JobRead:
        """Queue a failed or cancelled job again; it continues from its last checkpoint."""
        return JobRead.model_validate(self.request("POST", f"/v1/jobs/{job_id}/resume"))

    def wait(
        self,
        job_id: str | uuid.UUID,
        *,
        on_progress: Callable[[JobRead], None] | None = None,
        timeout: float | None = None,
        interval: float = 2.0,
    ) -> JobRead:
        """Poll until the job ends; ``on_progress(job)`` after every poll. Returns the final job.

        Raises:
            ClientError: ``wait_timeout`` when ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(
                    f"job {job_id} still {job.status} after {timeout}s", code="wait_timeout"
                )
            time.sleep(interval)

    # ---- models -----------------------------------------------------------------------------------
    def model(self, ref: str | uuid.UUID) -> ModelRead:
        """A model by id (names: use :meth:`download`/:meth:`classify`, which accept them)."""
        return ModelRead.model_validate(self.request("GET", f"/v1/models/{ref}"))

    def models(self, *, limit: int = 20, offset: int = 0) -> list[ModelRead]:
        page = self.request("GET", "/v1/models", params={"limit": limit, "offset": offset})
        return [ModelRead.model_validate(m) for m in page["items"]]

    def classify(
        self, ref: str | uuid.UUID, images: Sequence[Path | bytes], *, top_k: int = 5
    ) -> list[dict[str, Any]]:
        """Top-k per image, in order: ``[{"label", "score", "top_k": [...]}, ...]``.

        ``ref``: a model id, a job id, or a name (``name``, ``name:latest``, ``name:3``, ``name:TAG``).
        """
        files = [
            ("images", (f"{i}", _read(img), "application/octet-stream"))
            for i, img in enumerate(images)
        ]
        res = self.request(
            "POST", f"/v1/models/{ref}/classify", files=files, data={"top_k": str(top_k)}
        )
        results: list[dict[str, Any]] = res["results"]
        return results

    def download(
        self, ref: str | uuid.UUID, dest: Path | str, *, format: ModelFormat = "safetensors"
    ) -> Path:
        """Stream a model file to ``dest`` and check it against the server's SHA-256 digest."""
        return self._download(f"/v1/models/{ref}/download", {"format": format}, Path(dest))

    # ---- predictions ------------------------------------------------------------------------------
    def predict(
        self,
        ref: str | uuid.UUID,
        dataset_uri: str,
        *,
        top_k: int = 5,
        callback_url: str | None = None,
    ) -> JobRead:
        """Start a batch-predictions job over ``dataset_uri``; :meth:`wait` for it."""
        body: dict[str, Any] = {"dataset_uri": dataset_uri, "top_k": top_k}
        if callback_url:
            body["callback_url"] = callback_url
        return JobRead.model_validate(
            self.request("POST", f"/v1/models/{ref}/predictions", json=body)
        )

    def download_predictions(
        self,
        job_id: str | uuid.UUID,
        dest: Path | str,
        *,
        format: Literal["jsonl", "csv"] = "jsonl",
    ) -> Path:
        return self._download(f"/v1/jobs/{job_id}/predictions", {"format": format}, Path(dest))

    def _download(self, path: str, params: dict[str, str], dest: Path) -> Path:
        digest = hashlib.sha256()
        tmp = dest.with_name(dest.name + ".part")
        try:
            with self._http.stream("GET", path, params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_problem(r)
                with tmp.open("wb") as out:
                    for chunk in r.iter_bytes(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                want = r.headers.get("repr-digest")
        except httpx.TransportError as exc:
            tmp.unlink(missing_ok=True)
            raise Unreachable(f"cannot reach {self._http.base_url}: {exc}") from exc
        got = f"sha-256=:{base64.b64encode(digest.digest()).decode()}:"
        if want is not None and want != got:
            tmp.unlink(missing_ok=True)
            raise ClientError(f"{path}: digest mismatch ({got} != {want})", code="digest_mismatch")
        tmp.replace(dest)
        return dest


def _read(img: Path | bytes) -> bytes:
    if isinstance(img, bytes):
        return img
    try:
        return img.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {img}: {exc}", code="file_unreadable") from exc


def _raise_for_problem(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        body = r.json()
    except ValueError:
        body = {"detail": r.text[:500]}
    code = body.get("code") or f"http_{r.status_code}"
    detail = body.get("detail") or body.get("title") or r.reason_phrase
    raise ClientError(f"{detail} (HTTP {r.status_code})", code=str(code))
