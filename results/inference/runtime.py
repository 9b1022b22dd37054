"""onnxruntime sessions, created once per worker process and reused.

The file's sha256 is checked whenever a session is created, and again if the file changes on
disk (size or mtime): a model whose bytes differ from what was registered refuses to run.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Heavy (~0.35 s) on purpose: a worker pays it when it imports the inference services, not
# during its first study.
import onnxruntime
from django.conf import settings

from results.inference.registry import file_sha256
from results.models import AIModel

logger = logging.getLogger(__name__)


class ModelFileError(Exception):
    """The registered file is missing or no longer the one that was registered."""


class InferenceTimeout(Exception):
    pass


@dataclass
class _Cached:
    session: object
    stat: tuple[int, int]
    provider: str


_sessions: dict[tuple[str, str], _Cached] = {}
_lock = threading.Lock()


def session_for(model: AIModel):
    """The cached onnxruntime session for `model`, creating (and verifying) it when needed."""
    path = model.file_path
    key = (str(path), model.sha256)
    try:
        stat = path.stat()
    except OSError as exc:
        raise ModelFileError(f"model file {model.file} cannot be read: {exc.strerror}") from None
    signature = (stat.st_size, stat.st_mtime_ns)
    with _lock:
        cached = _sessions.get(key)
        if cached is not None and cached.stat == signature:
            return cached.session
        digest = file_sha256(path)
        if digest != model.sha256:
            _sessions.pop(key, None)
            raise ModelFileError(
                f"model file {model.file} has SHA-256 {digest[:16]}…, registered {model.sha256[:16]}…: refusing to run"
            )
        session = _create_session(path)
        _sessions[key] = _Cached(session=session, stat=signature, provider=session.get_providers()[0])
        logger.info("inference: loaded %s %s on %s", model.name, model.version, session.get_providers()[0])
        return session


def session_run(session, *, input_name: str, tensor: np.ndarray, timeout: float) -> dict[str, np.ndarray]:
    """Run the model; a run longer than `timeout` seconds is terminated and raises InferenceTimeout."""
    options = onnxruntime.RunOptions()
    timed_out = threading.Event()

    def terminate() -> None:
        timed_out.set()
        options.terminate = True

    timer = threading.Timer(timeout, terminate)
    timer.daemon = True
    timer.start()
    try:
        values = session.run(None, {input_name: tensor}, run_options=options)
    except Exception:
        if timed_out.is_set():
            raise InferenceTimeout(f"the model ran longer than {timeout:g} s and was stopped") from None
        raise
    finally:
        timer.cancel()
    return {output.name: value for output, value in zip(session.get_outputs(), values, strict=True)}


def sessions_clear() -> None:
    with _lock:
        _sessions.clear()


def _create_session(path: Path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.INFERENCE_INTRA_OP_THREADS
    options.inter_op_num_threads = settings.INFERENCE_INTER_OP_THREADS
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=execution_providers())


def execution_providers() -> list[str]:
    """From PACSLENS_INFERENCE_PROVIDER: auto (default: CUDA when present, else CPU), cpu, or cuda (required)."""
    available = onnxruntime.get_available_providers()
    wanted = settings.INFERENCE_PROVIDER
    if wanted == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelFileError("PACSLENS_INFERENCE_PROVIDER=cuda but this onnxruntime has no CUDA provider")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if wanted == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
