"""Running nft commands in-process through libnftables (the library behind nft(8)).

A `nft -f` process costs a fork and an exec of a large parent; libnftables does the same
work in this process. In a given namespace, the calling thread joins it for the call.
Falls back to the nft command when the library is not there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from contextlib import nullcontext
from pathlib import Path

from ..errors import SetupError
from .netns import entered, setns

_lib: ctypes.CDLL | None = None
_missing = False


def load() -> ctypes.CDLL | None:
    global _lib, _missing
    if _lib is None and not _missing:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1")
        except OSError:
            _missing = True
            return None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        _lib = lib
    return _lib


def run(script: str, ns_path: Path | None = None) -> None:
    """Apply an nft script (one atomic transaction), in this namespace or the one at path."""
    lib = load()
    if lib is None:
        return _run_cli(script, ns_path)
    # The context opens its netlink socket when it is made: make it inside the namespace.
    with entered(ns_path) if ns_path is not None else nullcontext():
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise SetupError("libnftables: cannot create a context")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, script.encode())
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
    if rc != 0:
        raise SetupError("nft: " + (" ".join(err.split())[:300] or f"error {rc}"))


def _run_cli(script: str, ns_path: Path | None) -> None:
    exe = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if exe is None:
        raise SetupError("neither libnftables nor the nft command is installed")
    preexec = (lambda: setns(ns_path)) if ns_path is not None else None
    proc = subprocess.run([exe, "-f", "-"], input=script, capture_output=True, text=True,
                          preexec_fn=preexec, timeout=30)
    if proc.returncode != 0:
        raise SetupError("nft: " + (" ".join(proc.stderr.split())[:300] or f"exit {proc.returncode}"))
