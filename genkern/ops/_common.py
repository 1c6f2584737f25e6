"""The one path every op takes: check, resolve the impl, call the reference or the kernel op.

Each hot path is a `KernelOp`: its ops torch.ops.genkern.<stem>_<family>_<direction>
(schemas in genkern/ops/_library.py), registered the same way for every op:

- fake kernels (shapes and dtypes only), so torch.compile(fullgraph=True) traces the ops;
- the Triton launchers (genkern/triton/<stem>.py), imported on first call;
- autograd on <stem>_<family>_fwd: the Python `backward`/`setup_context` of the op's
  module, unless genkern._C registered a C++ autograd kernel for that op
  (csrc/<stem>_autograd.cpp, where a benchmark showed the per-call cost matters).

A public op function checks its arguments (clear errors naming them), calls
`OP.resolve(impl, tensor)` and then either the reference (genkern/reference/<stem>.py)
or `OP(backend, *args)`.
"""

from __future__ import annotations

import torch

from genkern import _dispatch, _ext
from genkern.ops import _library

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(t, name, *, like=None, like_name=None):
    """t must be a floating tensor; with `like`, of like's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; pass one dtype")
        check_same_device(t, name, like, like_name)


def check_same_device(t, name, like, like_name):
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; pass one device")


def has_cpp_autograd(qualname: str) -> bool:
    """Whether genkern._C registered the autograd of op `qualname` (genkern::<name>)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


class KernelOp:
    """One hot path's kernel ops and how a call reaches them.

    Args:
        stem: the file stem shared by reference/, triton/, csrc/ and ops/ (e.g. "attention").
        public: the name errors and warnings use (e.g. "flash_attention").
        fake: the fake kernel of the forward op; fake_bwd: of the backward op, if any.
        backward, setup_context: the Python autograd of the forward op (None: no backward);
            setup_context finds `ctx.family` set to the kernel family that ran.
        eager: name of genkern._C's typed entry point to the forward op, which skips
            torch.ops' per-call argument parsing (used in eager mode when the extension is
            loaded; it takes the op's arguments plus `triton: bool`, and returns the op's
            outputs, or the first alone with `first_output`).
        first_output: calls return the forward op's first output only (the others, e.g. the
            gradients a fused loss saves for its backward, stay with autograd).
        cpp_dtypes, triton_dtypes: dtypes the kernels take, when not the defaults.
    """

    def __init__(
        self,
        stem,
        public,
        *,
        fake,
        fake_bwd=None,
        first_output=False,
        backward=None,
        setup_context=None,
        eager=None,
        cpp_dtypes=None,
        triton_dtypes=None,
    ):
        self.stem, self.public = stem, public
        self._fake, self._fake_bwd = fake, fake_bwd
        self._backward, self._setup_context = backward, setup_context
        self._first_output = first_output
        self._eager_name, self._eager = eager, None
        self._dtypes = {"cpp_dtypes": cpp_dtypes, "triton_dtypes": triton_dtypes}
        self._direction = "fwd" if fake_bwd is not None or backward is not None else ""
        self._ops = {}  # (family, direction) -> torch.ops overload, filled by register()

    def resolve(self, impl, like: torch.Tensor, public: str | None = None) -> str:
        """The impl that runs this op on tensors like `like` (genkern._dispatch.resolve);
        `public` names the function in messages when several share the op."""
        return _dispatch.resolve(impl, like.device, like.dtype, public or self.public, **self._dtypes)

    def __call__(self, backend: str, *args):
        """Runs the forward op of kernel family `backend` ("cpp" or "triton") on `args`.

        Under torch.compile: torch.ops.genkern.<op>, which dynamo traces. In eager mode, the
        extension's typed entry point when there is one.
        """
        if self._eager is not None and not torch.compiler.is_compiling():
            return self._eager(*args, backend == "triton")
        out = self._ops[backend, self._direction](*args)
        return out[0] if self._first_output else out

    def op(self, family: str, direction: str | None = None):
        """torch.ops.genkern.<stem>_<family>_<direction>.default (direction: the forward's by default)."""
        return self._ops[family, self._direction if direction is None else direction]

    def _setup_for(self, family: str):
        # The backward is shared by the families: the context says which one ran.
        def setup_context(ctx, inputs, output):
            ctx.family = family
            self._setup_context(ctx, inputs, output)

        return setup_context

    def register(self) -> None:
        """Fake kernels, Triton launchers and autograd of both kernel families (once, at import)."""
        from genkern.triton import bind

        _library.define()
        module = _ext.load()[0]  # registers the C++ kernels and autograd against the schemas
        for family in _library.FAMILIES:
            directions = (self._direction, "bwd") if self._fake_bwd is not None else (self._direction,)
            for direction in directions:
                name = _library.op_name(self.stem, family, direction)
                self._ops[family, direction] = getattr(torch.ops.genkern, name).default
            fwd = self.op(family)
            torch.library.register_fake(fwd, self._fake)
            if self._fake_bwd is not None:
                torch.library.register_fake(self.op(family, "bwd"), self._fake_bwd)
            if self._backward is not None and not has_cpp_autograd(fwd.name()):
                torch.library.register_autograd(fwd, self._backward, setup_context=self._setup_for(family))
        bind(self.stem)
        if module is not None and self._eager_name is not None:
            self._eager = getattr(module, self._eager_name)


def refuse_double_backward(op: str) -> None:
    """The fused backward kernels carry no graph: under create_graph=True a second derivative
    through them would silently be zero, so it is refused."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the fused kernels do not support double backward (create_graph=True); "
            "use impl='torch' for higher-order gradients"
        )
