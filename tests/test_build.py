"""A failed C++ build leaves a working package that says why the C++ impl is off; csrc/ compiles against the
headers of every supported torch."""

import ast
import concurrent.futures
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_failed_build_falls_back_to_torch(tmp_path):
    for name in ("csrc", "genkern", "setup.py", "pyproject.toml", "README.md"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(
                src, tmp_path / name, ignore=shutil.ignore_patterns("_C*.so", "__pycache__", "_build_error.txt")
            )
        elif src.exists():
            shutil.copy(src, tmp_path / name)
    env = dict(os.environ, CXX="/bin/false", CC="/bin/false", PYTHONPATH=str(tmp_path))
    env.pop("GENKERN_DISABLE_CPP", None)
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    error_file = tmp_path / "genkern" / "_build_error.txt"
    assert error_file.exists() and "genkern._C" in error_file.read_text()
    assert not list((tmp_path / "genkern").glob("_C*.so"))

    # An editable install of the main checkout must not supply genkern._C to the copy.
    probe = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import warnings, torch, genkern\n"
        "assert genkern.__file__.startswith(%r), genkern.__file__\n"
        "state = genkern.info()['impls']['cpp']\n"
        "assert not state['available'] and 'failed' in state['reason'], state\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    z, kl = genkern.reparameterize_kl(torch.zeros(3, 4), torch.zeros(3, 4))\n"
        "assert z.shape == (3, 4) and kl.shape == (3,) and any('plain-PyTorch' in str(x.message) for x in w)\n"
        "try:\n"
        "    genkern.reparameterize_kl(torch.zeros(3, 4), torch.zeros(3, 4), impl='cpp')\n"
        "except genkern.ImplUnavailableError as e:\n"
        "    print('refused:', e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe % str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused:" in run.stdout and "impl='cpp' is unavailable" in run.stdout

    # The op schemas come from Python: without genkern._C every op still runs with impl="triton"
    # (interpreted here), forward and backward, through the Python autograd.
    shutil.copy(ROOT / "tests" / "no_cpp_probe.py", tmp_path / "no_cpp_probe.py")
    run = subprocess.run(
        [sys.executable, "no_cpp_probe.py", str(tmp_path)],
        cwd=tmp_path,
        env=dict(env, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("ok ") == 21, run.stdout


# --- the sources build against the oldest supported torch's headers as well as the installed ones -----------
# Every csrc/*.cpp is compiled with `g++ -fsyntax-only` (setup.py's flags) against the include/ folder of the
# torch==OLDEST_TORCH wheel (a build of the extension checks the installed torch's). The wheel is fetched once
# with pip (PyPI) and only its torch/include is kept, in GENKERN_TORCH_HEADERS_CACHE (default ~/.cache/genkern).
# The aarch64 wheel is the smaller download; its headers are those of the x86_64 wheel except the
# build-configuration ones (ATen/Config.h, caffe2/core/macros.h, sleef.h) and vendor headers of one
# architecture (kai/, ittnotify, mimalloc). GENKERN_SKIP_OLD_TORCH_HEADERS=1 skips the old-torch check
# (e.g. without network); otherwise a failed download fails.
OLDEST_TORCH = "2.11.0"
HEADERS_WHEEL_PLATFORM = os.environ.get("GENKERN_TORCH_HEADERS_PLATFORM", "manylinux_2_28_aarch64")
INCLUDE_CSRC = re.compile(r'^\s*#\s*include\s*[<"](torch/csrc/[^>"]+)[>"]', re.MULTILINE)


def _cxx_flags():
    """setup.py's _cxx_flags, read from its source (importing setup.py would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = {"_cxx_flags", "_sanitizing", "_sanitize_flags"}  # _cxx_flags and what it calls
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    namespace = {"os": os, "platform": platform}
    exec(compile(ast.Module(body=funcs, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["_cxx_flags"]()


def _old_torch_include(version):
    """The include/ folder of the torch==version wheel, fetched into the cache on first use (atomically)."""
    cache = Path(os.environ.get("GENKERN_TORCH_HEADERS_CACHE", Path.home() / ".cache" / "genkern"))
    dest = cache / f"torch-{version}-include"
    if (dest / "torch" / "extension.h").is_file():
        return dest
    if os.environ.get("GENKERN_SKIP_OLD_TORCH_HEADERS") == "1":
        pytest.skip(f"GENKERN_SKIP_OLD_TORCH_HEADERS=1: not checking against torch {version}'s headers")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".torch-{version}-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"torch=={version}",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--platform",
            HEADERS_WHEEL_PLATFORM,
            "--python-version",
            "3.11",
            "--no-cache-dir",
            "-q",
            "-d",
            tmp,
        ]
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if got.returncode != 0 or not wheels:
            pytest.fail(
                f"could not download torch=={version} ({HEADERS_WHEEL_PLATFORM}) for its headers; this check "
                f"needs PyPI, or a cache at {dest}; set GENKERN_SKIP_OLD_TORCH_HEADERS=1 to skip it.\n"
                f"{' '.join(cmd)}\n{got.stderr[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(Path(tmp) / "x", [m for m in wheel.namelist() if m.startswith("torch/include/")])
        try:
            os.rename(Path(tmp) / "x" / "torch" / "include", dest)  # atomic; a concurrent fetch may have won
        except OSError:
            if not (dest / "torch" / "extension.h").is_file():
                raise
    return dest


def _syntax_errors(include_dirs):
    """Compiles every csrc/*.cpp with -fsyntax-only, in parallel; returns {file: compiler output} of the failures."""
    flags = [f for f in _cxx_flags() if not f.startswith("-O")] + [
        "-fsyntax-only",
        "-fPIC",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{ROOT / 'csrc'}",
        *(f"-isystem{d}" for d in include_dirs),
        f"-isystem{sysconfig.get_paths()['include']}",
    ]
    cxx = os.environ.get("CXX", "g++")

    def check(src):
        run = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True, timeout=900)
        return src.name, run.returncode, run.stderr

    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(check, sources))
    return {name: err[-3000:] for name, rc, err in results if rc != 0}


def _include_dirs(root):
    return [root, root / "torch" / "csrc" / "api" / "include"]


@pytest.mark.slow
def test_csrc_compiles_against_the_oldest_torch_headers():
    # The installed torch's headers are checked by every build of the extension.
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.fail("no C++ compiler (g++, or $CXX) for the header check")
    errors = _syntax_errors(_include_dirs(_old_torch_include(OLDEST_TORCH)))
    assert not errors, (
        f"csrc/ does not compile against torch {OLDEST_TORCH}'s headers ({', '.join(errors)}):\n"
        + "\n".join(f"--- {name}\n{err}" for name, err in errors.items())
    )


def test_csrc_uses_only_public_torch_headers():
    """torch/csrc/ headers are torch's internals: they change between releases (and are not all in the wheel)."""
    found = {
        p.name: INCLUDE_CSRC.findall(p.read_text())
        for p in sorted((ROOT / "csrc").iterdir())
        if p.suffix in (".cpp", ".h")
    }
    found = {name: inc for name, inc in found.items() if inc}
    assert not found, f"csrc files include torch/csrc/ internals: {found}"
