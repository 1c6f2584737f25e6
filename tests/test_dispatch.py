"""Impl selection (genkern._dispatch), GENKERN_IMPL, the cpp fallback and genkern.info()."""

from __future__ import annotations

import json
import textwrap
import warnings

import pytest
import torch

import genkern
import utils
from genkern import _dispatch
from genkern.reference import reparam_kl as reference


def _which_noise(z, mu, logvar, gen_clone, device):
    """'torch' if z used torch.randn noise from the generator, 'kernel' if the Philox noise."""
    std = torch.exp(0.5 * logvar.double())
    n_torch = torch.randn(mu.shape, dtype=mu.dtype, device=device, generator=utils.clone_generator(gen_clone))
    n_kernel = utils.kernel_noise(utils.seed_like_op(utils.clone_generator(gen_clone), device), mu.shape, device)
    dist = {
        name: ((z.double() - mu.double() - std * n.double()).abs() / std).max().item()
        for name, n in (("torch", n_torch), ("kernel", n_kernel))
    }
    name = min(dist, key=dist.get)
    assert dist[name] < 1e-3, f"z matches neither noise: {dist}"
    return name


@pytest.mark.parametrize("impl", utils.IMPLS)
def test_genkern_impl_env_sets_default(impl, monkeypatch):
    utils.require_impl(impl)
    device = utils.impl_device(impl)
    monkeypatch.setenv("GENKERN_IMPL", impl)  # read on every call: no cache to clear
    assert _dispatch.default_impl() == impl
    assert genkern.info()["default_impl"] == impl
    assert utils.resolve("auto", device, torch.float32) == impl
    assert utils.resolve(None, device, torch.float32) == impl
    mu, logvar = utils.make_inputs((4, 9), torch.float32, device)
    gen = torch.Generator(device=device).manual_seed(8)
    z, _ = genkern.reparameterize_kl(mu, logvar, generator=utils.clone_generator(gen))  # impl="auto"
    assert _which_noise(z, mu, logvar, gen, device) == ("torch" if impl == "torch" else "kernel")


def test_explicit_impl_beats_genkern_impl(monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.setenv("GENKERN_IMPL", "cpp")
    assert utils.resolve("torch", "cpu", torch.float32) == "torch"
    monkeypatch.setenv("GENKERN_IMPL", "torch")
    assert utils.resolve("cpp", "cpu", torch.float32) == "cpp"
    mu, logvar = utils.make_inputs((4, 9), torch.float32)
    gen = torch.Generator().manual_seed(8)
    z, _ = genkern.reparameterize_kl(mu, logvar, generator=utils.clone_generator(gen), impl="cpp")
    assert _which_noise(z, mu, logvar, gen, "cpu") == "kernel"


def test_genkern_impl_empty_means_auto(monkeypatch):
    monkeypatch.setenv("GENKERN_IMPL", "")
    assert _dispatch.default_impl() == "auto"
    monkeypatch.delenv("GENKERN_IMPL")
    assert _dispatch.default_impl() == "auto"


@pytest.mark.parametrize("value", ("bogus", "CPP", "torch "))
def test_invalid_genkern_impl(value, monkeypatch):
    monkeypatch.setenv("GENKERN_IMPL", value)
    mu = torch.randn(2, 3)
    with pytest.raises(ValueError, match="GENKERN_IMPL") as err:
        genkern.reparameterize_kl(mu, mu)
    assert repr(value) in str(err.value)  # names the bad value
    # An explicit impl does not consult GENKERN_IMPL.
    z, kl = genkern.reparameterize_kl(mu, mu, torch.zeros_like(mu), impl="torch")
    assert torch.equal(z, mu)


def test_genkern_impl_from_process_start():
    code = textwrap.dedent("""
        import json, torch, genkern
        from genkern import _dispatch
        print(json.dumps([_dispatch.resolve("auto", torch.device("cpu"), torch.float32, "x"),
                          genkern.info()["default_impl"]]))
    """)
    r = utils.run_python(code, {"GENKERN_IMPL": "torch"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["torch", "torch"]


@pytest.mark.parametrize("dtype", utils.ALL_DTYPES, ids=str)
def test_auto_picks_cpp_on_cpu(dtype, monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        assert utils.resolve("auto", "cpu", dtype) == "cpp"


def test_auto_falls_back_once_with_reason(monkeypatch):
    # cpp cannot run meta tensors: "auto" falls back to torch and warns once per (op, reason).
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    op = "test_dispatch_fallback_probe"  # a fresh op name: the warn-once record is per op
    meta = torch.device("meta")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.resolve("auto", meta, torch.float32, op) == "torch"
        assert _dispatch.resolve("auto", meta, torch.float32, op) == "torch"
    msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    cpp = genkern.info()["impls"]["cpp"]
    reason = "meta" if cpp["available"] else cpp["reason"]  # the reason cpp cannot run these tensors
    assert op in msgs[0] and "cpp" in msgs[0] and reason in msgs[0], msgs[0]


@pytest.mark.parametrize("impl", ("cpp", "triton"))
def test_explicit_unavailable_raises_not_falls_back(impl):
    meta = torch.device("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(genkern.ImplUnavailableError, match=impl):
            _dispatch.resolve(impl, meta, torch.float32, "test_dispatch_explicit_probe")


def test_impl_unavailable_error_is_runtime_error():
    assert issubclass(genkern.ImplUnavailableError, RuntimeError)


_DISABLED_CPP = textwrap.dedent("""
    import json, warnings, torch
    import genkern
    from genkern.reference import reparam_kl as reference
    info = genkern.info()
    mu, lv, eps = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        z1, kl1 = genkern.reparameterize_kl(mu, lv, eps)  # FIRST CALL
        z2, kl2 = genkern.reparameterize_kl(mu, lv, eps)
        z3, kl3 = genkern.reparameterize_kl(mu, lv)                 # eps=None works too
    zr, klr = reference.reparameterize_kl(mu, lv, eps)
    print(json.dumps({
        "cpp": info["impls"]["cpp"], "triton": info["impls"]["triton"],
        "warnings": [[str(x.message), x.category.__name__, x.filename, x.lineno] for x in w],
        "match": bool(torch.equal(z1, zr) and torch.equal(kl1, klr) and torch.equal(z2, zr)),
        "shapes": [list(z3.shape), list(kl3.shape)],
    }))
""")


def test_cpp_disabled_falls_back_with_one_warning():
    r = utils.run_python(_DISABLED_CPP, {"GENKERN_DISABLE_CPP": "1", "GENKERN_IMPL": None})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cpp"] == {"available": False, "reason": "disabled by GENKERN_DISABLE_CPP"}
    assert out["match"] and out["shapes"] == [[3, 5], [3]]
    runtime = [x for x in out["warnings"] if x[1] == "RuntimeWarning"]
    assert len(runtime) == 1, out["warnings"]
    msg, _, filename, lineno = runtime[0]
    assert "cpp" in msg and "GENKERN_DISABLE_CPP" in msg and "reparameterize_kl" in msg
    first = 1 + next(i for i, line in enumerate(_DISABLED_CPP.splitlines()) if "FIRST CALL" in line)
    assert (filename, lineno) == ("<string>", first), "the warning should point at the caller's line"


def test_cpp_disable_zero_means_enabled():
    utils.require_impl("cpp")
    code = "import json, genkern; print(json.dumps(genkern.info()['impls']['cpp']['available']))"
    r = utils.run_python(code, {"GENKERN_DISABLE_CPP": "0"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) is True


def test_info_structure():
    info = genkern.info()
    assert set(info) >= {"genkern", "python", "torch", "triton", "cuda", "devices", "default_impl", "impls"}
    assert info["genkern"] == genkern.__version__
    assert info["torch"] == torch.__version__
    assert info["default_impl"] in _dispatch.IMPLS
    assert info["devices"][0]["type"] == "cpu" and info["devices"][0]["threads"] >= 1
    cuda = [d for d in info["devices"] if d["type"] == "cuda"]
    assert len(cuda) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(info["impls"]) == {"torch", "cpp", "triton"}
    for name, state in info["impls"].items():
        assert isinstance(state["available"], bool) and isinstance(state["reason"], str)
        assert state["available"] == (state["reason"] == ""), name
    assert info["impls"]["torch"]["available"]
    assert isinstance(info["impls"]["triton"]["interpreter"], bool)
    assert info["impls"]["triton"]["interpreter"] == _dispatch.triton_interpret()
    if info["impls"]["cpp"]["available"]:
        assert "compiler=" in info["impls"]["cpp"]["build"]
    else:
        assert "build" not in info["impls"]["cpp"]
    json.dumps(info)  # plain data, printable by `genkern info`


@pytest.mark.gpu
def test_gpu_auto_float64_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    utils.require_impl("triton")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _dispatch.resolve("auto", torch.device("cuda"), torch.float64, "test_gpu_probe") == "torch"
    assert any("float64" in str(x.message) for x in w)
    mu = torch.randn(4, 5, device="cuda", dtype=torch.float64)
    z, kl = genkern.reparameterize_kl(mu, mu, torch.zeros_like(mu))
    torch.testing.assert_close(kl, reference.kl_divergence(mu, mu))
