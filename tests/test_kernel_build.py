"""The CPU kernel build (dsv2/cpu/build.py) can never hang a run: a process SIGKILLed mid-build leaves nothing that
makes the next one wait, a build in progress is waited for at most BUILD_WAIT_S, and the build folder is named by
what goes into the library (not by where dsv2 is installed), so installs never rebuild each other's kernels.

The first test builds the kernels from scratch in a private folder (about a minute)."""

import fcntl
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

import dsv2
from dsv2.checkpoint import save_pretrained
from dsv2.cpu import build


def test_a_build_killed_midway_does_not_hang_the_next_command(tmp_path):
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("DSV2_NO_KERNELS", None)
    torch.manual_seed(0)
    save_pretrained(dsv2.DeepseekV2(tiny_config(num_hidden_layers=2)), tmp_path / "ckpt")
    first = subprocess.Popen([sys.executable, "-c", "from dsv2.cpu import ops; ops.load_kernels()"], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / "ext" / "*" / "lock")):  # torch's own lock file: the compiler is running
        assert time.time() < deadline and first.poll() is None, "the build never started"
        time.sleep(0.05)
    time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # python, ninja and the compilers: nothing gets to clean up
    first.wait()
    assert glob.glob(str(tmp_path / "ext" / "*" / "lock"))  # what used to make every later process wait forever

    nxt = subprocess.run([sys.executable, "-m", "dsv2", "generate", "--model", str(tmp_path / "ckpt"), "--ids",
                          "0,5,6", "--max-new-tokens", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    assert len(nxt.stdout.split()) == 3
    assert glob.glob(str(tmp_path / "ext" / "*" / build.DONE))  # and it did build the kernels


def test_a_build_in_progress_is_waited_for_at_most_the_limit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("DSV2_NO_KERNELS", raising=False)
    monkeypatch.setattr(build, "BUILD_WAIT_S", 2)
    from torch.utils import cpp_extension

    folder = cpp_extension._get_build_directory(build._name(), verbose=False)
    fd = os.open(os.path.join(folder, "dsv2-build.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process is building"
    os.pwrite(fd, b"4242\n", 0)
    try:
        t0 = time.time()
        assert build.load() is None
        assert time.time() - t0 < 10
    finally:
        os.close(fd)
    text = caplog.text
    assert "waiting for process 4242" in text and "going on without the kernels" in text


def test_build_folder_named_by_its_inputs_not_by_the_install(tmp_path, monkeypatch):
    name = build._name()
    copy = tmp_path / "other-install" / "kernels"
    shutil.copytree(build.SOURCE_DIR, copy)
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    assert build._name() == name  # the same sources elsewhere share one build
    with open(copy / "rms_norm.cpp", "a") as f:
        f.write("\n// changed\n")
    assert build._name() != name  # changed sources get their own
    monkeypatch.setattr(build, "SOURCE_DIR", build.Path(build.__file__).parent)
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "another-venv" / "torch" / "__init__.py"))
    assert build._name() != name  # another torch install (other include paths in build.ninja) too


@pytest.mark.usefixtures("kernels")
def test_a_built_library_is_loaded_without_the_loader(monkeypatch):
    from torch.utils import cpp_extension

    def no_loader(*a, **k):
        raise AssertionError("cpp_extension.load called for a library that is already built")

    monkeypatch.setattr(cpp_extension, "load", no_loader)
    assert build.load() is not None


def test_a_damaged_library_is_built_again(tmp_path, monkeypatch, caplog):
    """A finished build whose library no longer loads (a disk error, a bad copy) is rebuilt, not given up on."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("DSV2_NO_KERNELS", raising=False)
    from torch.utils import cpp_extension

    name = build._name()
    folder = build.Path(cpp_extension._get_build_directory(name, verbose=False))
    (folder / f"{name}.so").write_bytes(b"not a library")
    (folder / build.DONE).write_text(name)
    seen = []

    def fake_load(*a, **k):  # the compile itself is the first test's business
        seen.append((k["build_directory"], (folder / f"{name}.so").exists(), (folder / build.DONE).exists()))
        return "rebuilt"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert build.load() == folder / f"{name}.so"
    assert seen == [(str(folder), False, False)]  # the bad library and its marker were removed, then built
    assert (folder / build.DONE).exists() and "do not load" in caplog.text
