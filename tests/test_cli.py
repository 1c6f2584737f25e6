"""The command line: `genkern info`, `python -m genkern`, one-line errors."""

import json
import os
import subprocess
import sys

import pytest


def _run(*args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "genkern", *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_info_prints_versions_devices_and_impls():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "device  cpu" in out.stdout
    for impl in ("torch", "cpp", "triton"):
        assert f"impl  {impl}" in out.stdout


def test_info_json_matches_python_api():
    import genkern

    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["torch"] == genkern.info()["torch"]
    assert set(data["impls"]) == {"torch", "cpp", "triton"}


def test_info_says_why_cpp_is_off():
    out = _run("info", env={"GENKERN_DISABLE_CPP": "1"})
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("impl  cpp"))
    assert "off" in line and "GENKERN_DISABLE_CPP" in line


def test_info_reports_an_invalid_default_impl():
    out = _run("info", env={"GENKERN_IMPL": "bogus"})
    assert out.returncode == 0, out.stderr
    assert "default impl: invalid" in out.stdout
    assert "GENKERN_IMPL must be one of" in out.stdout and "'bogus'" in out.stdout


@pytest.mark.parametrize("args", [["bench", "--device", "tpu"], ["bench", "--sizes", "huge"]])
def test_error_is_one_line_and_nonzero_exit(args):
    out = _run(*args)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genkern bench:"), out.stderr


@pytest.mark.parametrize("args", [[], ["frobnicate"]])
def test_usage_errors_exit_nonzero(args):
    out = _run(*args)
    assert out.returncode == 2 and "usage: genkern" in out.stderr


@pytest.mark.parametrize("command", ["train", "sample"])
def test_bad_impl_is_a_usage_error(command):
    from genkern import cli

    argv = {"train": ["train", "vae", "--out", "unused"], "sample": ["sample", "--checkpoint", "unused"]}[command]
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv + ["--impl", "fast"])
    assert info.value.code == 2
    args = cli.build_parser().parse_args(argv + ["--impl", "cpp"])
    assert args.impl == "cpp"


def test_bad_impl_message(capsys):
    from genkern import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "vae", "--impl", "fast"])
    assert "--impl must be one of auto, torch, cpp, triton, got 'fast'" in capsys.readouterr().err
