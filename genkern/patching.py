"""Process-wide replacement of torch.nn.functional.scaled_dot_product_attention by genkern's drop-in.

Model code written against torch (nanoGPT, gpt-fast-style decoders, most hand-written attention) calls
F.scaled_dot_product_attention by name at run time; swapping that one attribute puts genkern's kernels under
it without touching the model. genkern.functional.scaled_dot_product_attention holds torch's own function
from import time, so the swap never makes it call itself.

What is replaced: only the Python attribute `torch.nn.functional.scaled_dot_product_attention`. Not
`torch._C._nn.scaled_dot_product_attention` (torch's binding, which the drop-in itself falls back to), nor
names bound earlier with `from torch.nn.functional import scaled_dot_product_attention` (they keep the
function they were bound to), nor the aten op that torch.compile or TorchScript reach directly.
"""

from __future__ import annotations

import contextlib
import threading

import torch.nn.functional as F

from genkern import functional

_NAME = "scaled_dot_product_attention"
_lock = threading.Lock()
_replaced = None  # the function patch() found in place; None while not patched


def is_patched() -> bool:
    """Whether torch.nn.functional.scaled_dot_product_attention is genkern's drop-in now."""
    return getattr(F, _NAME) is functional.scaled_dot_product_attention


def patch() -> None:
    """Makes torch.nn.functional.scaled_dot_product_attention genkern's drop-in, process-wide.

    Idempotent: patching twice is patching once (the function kept for unpatch() is the one found by the
    first patch, never genkern's own). Calls the drop-in cannot run on a kernel (masks, dropout, is_causal
    with T != S, an sdpa_kernel context without FLASH_ATTENTION, ...) run torch's own function.
    """
    global _replaced
    with _lock:
        if is_patched():
            return
        _replaced = getattr(F, _NAME)
        setattr(F, _NAME, functional.scaled_dot_product_attention)


def unpatch() -> None:
    """Puts back exactly the function that patch() replaced; a no-op when not patched.

    If something else replaced genkern's drop-in after patch(), that replacement is left in place (putting
    the old function back would silently undo it); only genkern's record of the patch is dropped.
    """
    global _replaced
    with _lock:
        if _replaced is not None and is_patched():
            setattr(F, _NAME, _replaced)
        _replaced = None


@contextlib.contextmanager
def patched():
    """`with genkern.patched():` runs its body with patch() in effect and leaves the state it found.

    Nested contexts (or one inside an explicit patch()) leave the patch in place on exit; only the context
    that applied it takes it off.
    """
    applied = not is_patched()
    patch()
    try:
        yield
    finally:
        if applied:
            unpatch()
