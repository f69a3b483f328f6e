"""The one check of a device string, made where it enters stexp.

:func:`check_device` is called once by each entry point that takes a ``device``: :func:`stexp.tl.fit`,
:func:`stexp.tl.predict`, :func:`stexp.tl.cross_validate`, :func:`stexp.models.load`,
:func:`stexp.pp.embed_images` and ``stexp predict``. Past it, a device string is known to be one stexp
runs on and, for a GPU, one this machine has; torch never sees ``"gpu"`` or a CUDA device on a machine
without one. torch is imported only to check a GPU, so ``"auto"`` and ``"cpu"`` cost nothing.
"""

from __future__ import annotations

import re
from typing import Any

#: The accepted device strings, as error messages list them.
ACCEPTED = "'auto' (CUDA when available, else the CPU), 'cpu', 'cuda', 'cuda:N' (N: a GPU index) or 'mps'"
_FORM = re.compile(r"(auto|cpu|mps|cuda(?::(\d+))?)")
#: Names users reach for that torch does not take, and what they mean.
_ALIASES = {"gpu": "cuda", "nvidia": "cuda"}


def _hint(device: str) -> str:
    low = device.strip().lower()
    name, sep, index = low.partition(":")
    meant = _ALIASES.get(name)
    if meant is not None and (not sep or index.isdigit()):
        return f" For a GPU pass {meant + sep + index!r}."
    if low != device and _FORM.fullmatch(low):
        return f" Did you mean {low!r}?"
    return ""


def check_device(device: Any, *, what: str = "device") -> str:
    """Return ``device`` as a string after checking that stexp can run there on this machine.

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (a :class:`torch.device` is taken as
        its string). ``"auto"`` is returned as it is (resolved to CUDA or the CPU when work starts); when
        ``stexp.settings.device`` is not ``"auto"``, that is what ``"auto"`` means, and it is checked too.
    what
        The name of the argument, for the message.

    Returns
    -------
    The device string, unchanged.

    Raises
    ------
    ValueError
        If ``device`` is not one of the accepted forms (the message names it and lists them), or names a
        GPU this machine does not have: CUDA not available, a ``cuda:N`` index beyond the visible devices,
        or MPS not available (the message suggests ``device="cpu"`` or ``"auto"``).
    """
    if type(device).__module__ == "torch" and type(device).__name__ == "device":
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"{what} must be a string, {ACCEPTED}; got {device!r} ({type(device).__name__}).")
    match = _FORM.fullmatch(device)
    if match is None:
        raise ValueError(f"{what}={device!r} is not a device stexp runs on; pass {ACCEPTED}.{_hint(device)}")
    if device == "auto":
        from stexp._settings import settings

        if settings.device not in (None, "auto"):
            check_device(settings.device, what="stexp.settings.device")
        return device
    if device == "cpu":
        return device
    import torch

    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"{what}={device!r}, but MPS (the Apple GPU) is not available on this machine; "
                f"pass {what}='cpu', or {what}='auto' to use a GPU only where there is one."
            )
        return device
    if not torch.cuda.is_available():
        raise ValueError(
            f"{what}={device!r}, but CUDA is not available on this machine (torch {torch.__version__} sees no "
            f"NVIDIA GPU); pass {what}='cpu', or {what}='auto' to use a GPU only where there is one."
        )
    if match.group(2) is not None:
        index, count = int(match.group(2)), torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"{what}={device!r}, but this machine has {count} visible CUDA device(s) "
                f"(cuda:0 .. cuda:{count - 1}); pass one of them, {what}='cuda' or {what}='auto'."
            )
    return device
