"""The model cache of worker processes: a model file is loaded once per process, keyed
by its SHA-256, weights and device."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import StegoError
from .writes import WORK_DIR


_MODELS: dict[tuple, object] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_LOADS = 0  # how many times this process really loaded a model (tests read it)
_MAX_MODELS = 4


@dataclass(frozen=True)
class _ModelRef:
    path: str
    sha256: str
    weights: str | None = None
    device: str | None = None

    @property
    def key(self) -> tuple:
        return self.sha256, self.weights, self.device


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_model(path: str | Path, *, weights: str | Path | None = None,
                 device: str | None = None, sha256: str | None = None):
    """:meth:`StegoModel.load` once per process and model file (thread-safe).

    Workers call this for every plane; only the first call in a process loads. The key is
    the file's SHA-256 (so a changed file is reloaded), the weights file and the device.
    """
    ref = _ModelRef(str(path), sha256 or _file_sha256(Path(path)),
                    None if weights is None else str(weights), device)
    return _model_of(ref)


def _model_of(ref: _ModelRef):
    global _MODEL_LOADS
    with _MODELS_LOCK:
        model = _MODELS.get(ref.key)
        if model is None:
            from ..model import StegoModel

            model = StegoModel.load(ref.path, weights=ref.weights, device=ref.device)
            if len(_MODELS) >= _MAX_MODELS:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[ref.key] = model
            _MODEL_LOADS += 1
        return model


def _prepare_model(model, out: Path, weights, device, local: bool
                   ) -> tuple[_ModelRef, object, str, Path | None]:
    """``(ref, model, shown_path, temporary_file)``: what workers load, the model loaded
    here (so an unreadable or incompatible model fails at once, before any work), the path
    recorded in the outputs, and a file to delete when the job ends.

    A model object is saved into the output's work folder so that worker processes (which
    share no memory with this one) can load it; with an in-process scheduler the object
    itself is used.
    """
    from ..model import StegoModel

    dev = None if device in (None, "auto") else str(device)
    wts = None if weights is None else str(weights)
    if isinstance(model, StegoModel):
        work = out / WORK_DIR
        work.mkdir(parents=True, exist_ok=True)
        tmp = model.save(work / f"model-{uuid.uuid4().hex[:8]}.stego")
        sha = _file_sha256(tmp)
        path = work / f"model-{sha[:16]}.stego"
        os.replace(tmp, path)
        ref = _ModelRef(str(path.resolve()), sha, wts, dev)
        if local:
            with _MODELS_LOCK:
                _MODELS[ref.key] = model
        return ref, model, "<in-memory model>", path
    path = Path(model)
    if not path.is_file():
        raise StegoError(f"model file {path} does not exist")
    ref = _ModelRef(str(path.resolve()), _file_sha256(path), wts, dev)
    if local:
        return ref, _model_of(ref), ref.path, None
    # the workers load it themselves; load it here too, on the CPU, to fail early
    return ref, StegoModel.load(path, weights=weights, device="cpu"), ref.path, None
