"""Test setup: the Triton interpreter on GPU-less machines, the `gpu` marker, impl checks.

TRITON_INTERPRET must be in the environment before anything imports triton
(genkern imports it lazily, on the first Triton call, and genkern._dispatch
caches whether Triton can run), so it is set here, before genkern is imported.
"""

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import genkern  # noqa: E402,F401  (after TRITON_INTERPRET is set)
import utils  # noqa: E402  (tests/ is on sys.path: pytest's rootdir conftest import)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_impl(request):
    """A test parametrised with `impl` fails (never silently skips) when that impl cannot run.

    The C++ impl is built in CI, so a missing build is a failure unless
    GENKERN_ALLOW_NO_CPP=1; the Triton impl skips only when triton is not installed.
    """
    callspec = getattr(request.node, "callspec", None)
    impl = callspec.params.get("impl") if callspec is not None else None
    if impl is not None:
        utils.require_impl(impl)
    yield
