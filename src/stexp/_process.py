"""Leave the user's process as it was found: RNG states, torch threads, determinism flags, environment, Ctrl+C.

Training and embedding need seeded randomness, a thread count and (on CPU) deterministic kernels;
Lightning sets all of these process-wide (``seed_everything`` reseeds every global RNG and writes
``PL_GLOBAL_SEED``/``PL_SEED_WORKERS``, ``deterministic=True`` switches torch's deterministic mode on and
sets ``CUBLAS_WORKSPACE_CONFIG``; a Ctrl+C during ``Trainer.fit`` makes it ignore SIGINT for the rest
of the process). :func:`preserve_process_state` restores them when a stexp call returns or raises, so a
user's ``np.random``/``torch`` streams, ``torch.get_num_threads()``, ``os.environ`` and the SIGINT
handler are what they were before the call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def preserve_process_state() -> Iterator[None]:
    """Restore global RNG states, torch threads, torch determinism flags and ``os.environ`` on exit.

    torch is only touched when it is already imported (a call that never imports torch changes none
    of its state).
    """
    import numpy as np

    py_state = random.getstate()
    np_state = np.random.get_state()
    environ = dict(os.environ)
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
    torch = sys.modules.get("torch")
    torch_state = _torch_state(torch) if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            _restore_torch(torch, torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
        if main_thread and sigint is not None and signal.getsignal(signal.SIGINT) is not sigint:
            signal.signal(signal.SIGINT, sigint)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _torch_state(torch) -> dict[str, Any]:
    state = {
        "rng": torch.random.get_rng_state(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cuda_rng": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_torch(torch, state: dict[str, Any] | None) -> None:
    if state is None:  # torch was imported during the call: put back what a fresh import has
        state = {
            "rng": None,
            "threads": None,
            "deterministic": False,
            "warn_only": False,
            "cudnn_deterministic": False,
            "cudnn_benchmark": False,
            "cuda_rng": None,
        }
    if state["rng"] is not None:
        torch.random.set_rng_state(state["rng"])
    if state["threads"] is not None and torch.get_num_threads() != state["threads"]:
        torch.set_num_threads(state["threads"])
    torch.use_deterministic_algorithms(state["deterministic"], warn_only=state["warn_only"])
    torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def leaves_process_state(func: F) -> F:
    """Decorator: run ``func`` inside :func:`preserve_process_state`."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with preserve_process_state():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
