"""The CUDA extension builds, links and imports without a GPU, and fails clearly there.

Runs on CPU CI (nvcc present, no GPU) and skips with a reason when nvcc is absent. The
kernels' numerics are tested in test_cuda_host_twin.py (on the CPU) and, on a GPU, by the whole
of test_gaussian_kl.py with backend="cuda".
"""

from __future__ import annotations

import importlib.util
import stat
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch
from setuptools import Distribution

import amvl_kernels as ak
import build_cuda
from amvl_kernels import _cuda_gaussian_kl
from tests._cuda_ext import ROOT, built_extension, nvcc_or_skip

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-device path")


@pytest.fixture(scope="module")
def ext():
    return built_extension()


def _matrix():
    return (0, 4, 1, 0)  # never dereferenced: the device check comes first


# ----------------------------------------------------------------------------- the module


def test_builds_links_and_imports(ext):
    assert ext.cuda_runtime_version() >= 11000
    for name in ("device_count", "forward", "backward", "forward_host", "backward_host",
                 "philox4x32_10"):
        assert callable(getattr(ext, name)), name


@NO_GPU
def test_reports_no_device(ext):
    assert ext.device_count() == 0


@NO_GPU
def test_launch_without_device_is_a_runtime_error(ext):
    common = dict(dtype=0, rows=2, d=4, seed=1, mu_q=_matrix(), lv_q=_matrix(), mu_p=None,
                  lv_p=None, eps=None, device=0, stream=0)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.forward(**common, z=16, kl_fwd=0, kl_rev=0)  # never written: no device
    with pytest.raises(RuntimeError, match="no CUDA device"):
        ext.backward(**common, grad_z=_matrix(), grad_kl_fwd=None, grad_kl_rev=None,
                     fwd_to_q=False, fwd_to_p=False, rev_to_q=False, rev_to_p=False,
                     grad_mu_q=0, grad_lv_q=0, grad_mu_p=0, grad_lv_p=0)
    assert ext.device_count() == 0  # the failed launch left no sticky error behind


def test_bad_arguments_are_value_errors(ext):
    with pytest.raises(ValueError, match="dtype code"):
        ext.forward_host(dtype=7, rows=1, d=1, seed=0, mu_q=_matrix(), lv_q=_matrix(),
                         mu_p=None, lv_p=None, eps=None, z=16, kl_fwd=0, kl_rev=0)
    with pytest.raises(ValueError, match="mu_p and lv_p"):
        ext.forward_host(dtype=0, rows=1, d=1, seed=0, mu_q=_matrix(), lv_q=_matrix(),
                         mu_p=_matrix(), lv_p=None, eps=None, z=0, kl_fwd=0, kl_rev=0)
    out = torch.empty(1)
    with pytest.raises(ValueError, match="z is required"):
        ext.forward_host(dtype=0, rows=1, d=1, seed=0, mu_q=_matrix(), lv_q=_matrix(),
                         mu_p=None, lv_p=None, eps=None, z=0, kl_fwd=0, kl_rev=0)
    with pytest.raises(ValueError, match="kl_fwd and kl_rev are required"):
        ext.forward_host(dtype=0, rows=1, d=1, seed=0, mu_q=_matrix(), lv_q=_matrix(),
                         mu_p=_matrix(), lv_p=_matrix(), eps=None, z=out.data_ptr(),
                         kl_fwd=0, kl_rev=0)
    bf16 = (_matrix()[0], 1, 1, 2)  # the code of bf16 data in an fp32 call
    with pytest.raises(ValueError, match="lv_q has dtype code 2"):
        ext.forward_host(dtype=0, rows=1, d=1, seed=0, mu_q=_matrix(), lv_q=bf16,
                         mu_p=None, lv_p=None, eps=None, z=out.data_ptr(), kl_fwd=0, kl_rev=0)


# ----------------------------------------------------------------------------- the package


def test_cuda_extension_available_matches_the_in_place_module():
    """Available when the in-place module imports and was built from today's csrc/."""
    from amvl_kernels._source_hash import source_hash

    in_place = importlib.util.find_spec("amvl_kernels._C") is not None
    current = False
    if in_place:
        from amvl_kernels import _C

        current = getattr(_C, "source_hash", None) == source_hash(ROOT / "csrc")
        if not torch.cuda.is_available():
            assert _C.device_count() == 0
    ak.cuda_extension_available.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ak.cuda_extension_available() == (in_place and current)
    assert any("other sources" in str(w.message) for w in caught) == (in_place and not current)


def test_compiled_code_can_ask_whether_the_extension_is_there():
    """torch.compile keeps the answer as a constant instead of breaking the graph on the import
    and file reads inside: an op asked for backend="cuda" compiles with fullgraph=True."""
    expected = ak.cuda_extension_available()

    def answer(x):
        return x + 1 if ak.cuda_extension_available() else x - 1

    torch._dynamo.reset()
    out = torch.compile(answer, backend="eager", fullgraph=True)(torch.zeros(3))
    assert out.tolist() == [1.0 if expected else -1.0] * 3


def test_the_module_carries_its_sources_fingerprint(ext):
    """A module built from csrc/ says so; one built from other sources would not match."""
    from amvl_kernels._source_hash import source_hash

    assert ext.source_hash == source_hash(ROOT / "csrc") != 0


@NO_GPU
@pytest.mark.parametrize("call", [
    lambda t: ak.gaussian_sample_kl(*t, backend="cuda"),
    lambda t: ak.gaussian_sample(t[0], t[1], backend="cuda"),
    lambda t: _cuda_gaussian_kl.forward(*t, None, 0),
    lambda t: _cuda_gaussian_kl.backward(*t, None, 0, t[0], None, None, "p", "q",
                                         [True, True, False, False]),
], ids=["gaussian_sample_kl", "gaussian_sample", "launcher_forward", "launcher_backward"])
def test_cuda_backend_on_cpu_tensors_is_a_value_error(call):
    tensors = [torch.randn(3, 4) for _ in range(4)]
    with pytest.raises(ValueError, match="CUDA tensors"):
        call(tensors)


def test_auto_backend_stays_on_triton_or_torch():
    assert ak.resolve_backend("auto", torch.device("cpu"), has_cuda_kernel=True) == "torch"
    assert ak.resolve_backend("auto", torch.device("cuda"), has_cuda_kernel=True) == "triton"


# ----------------------------------------------------------------------------- build_cuda


def _fake_nvcc(tmp_path: Path, archs: str, compiles: bool) -> str:
    """An nvcc stand-in that lists `archs` and either fails every compile or does nothing."""
    script = tmp_path / "nvcc"
    listing = "\n".join(f"compute_{a}" for a in archs.split())
    compile_step = "exit 0\n" if compiles else 'echo "nvcc: simulated failure" >&2; exit 1\n'
    script.write_text("#!/bin/sh\n"
                      f'if [ "$1" = "--list-gpu-arch" ]; then printf "{listing}\\n"; exit 0; fi\n'
                      + compile_step)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_arch_selection(tmp_path, monkeypatch):
    monkeypatch.delenv("AMVL_CUDA_ARCHS", raising=False)
    old = _fake_nvcc(tmp_path, "75 80 86 90", compiles=True)
    assert build_cuda.select_archs(old) == ["80", "90"]
    new = _fake_nvcc(tmp_path, "75 80 90 100 103 120 121", compiles=True)
    assert build_cuda.select_archs(new) == ["80", "90", "100", "120"]
    monkeypatch.setenv("AMVL_CUDA_ARCHS", "9.0; sm_80,120 300")
    assert build_cuda.select_archs(new) == ["80", "90", "120"]  # 300 dropped with a warning
    flags = build_cuda.gencode_flags(["80", "90", "120"])
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert flags[-1] == "-gencode=arch=compute_120,code=compute_120"  # PTX of the newest only
    monkeypatch.setenv("AMVL_CUDA_ARCHS", "SM_90, 8.0+PTX; sm_90a 100f 121a")
    assert build_cuda.select_archs(new) == ["80", "90", "90a", "100f", "121a"]
    assert build_cuda.gencode_flags(["90", "90a"])[-1] == \
        "-gencode=arch=compute_90,code=compute_90"  # PTX that runs beyond the 90a GPU
    assert build_cuda.gencode_flags(["90a"]) == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("AMVL_CUDA_ARCHS", "  ")  # blank: the default
    assert build_cuda.select_archs(new) == ["80", "90", "100", "120"]
    monkeypatch.setenv("AMVL_CUDA_ARCHS", "300")
    with pytest.raises(RuntimeError, match="none of the CUDA architectures"):
        build_cuda.select_archs(new)


def test_local_nvcc_supports_the_default_archs():
    nvcc = nvcc_or_skip()
    archs = build_cuda.select_archs(nvcc, ";".join(build_cuda.DEFAULT_ARCHS))
    assert archs == list(build_cuda.DEFAULT_ARCHS)


def _run_build_ext(tmp_path: Path, nvcc: str, force: bool):
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    ext_modules, cmdclass = build_cuda.cuda_extension_and_cmdclass(ROOT, nvcc, sources,
                                                                   force=force)
    dist = Distribution({"name": "amvl-build-test", "ext_modules": ext_modules,
                         "cmdclass": cmdclass})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(tmp_path / "lib")
    cmd.build_temp = str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return cmd


def test_failed_build_warns_and_installs_without_the_extension(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("AMVL_CUDA_ARCHS", raising=False)
    stale = tmp_path / "lib" / "amvl_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a module of an earlier build")
    cmd = _run_build_ext(tmp_path, _fake_nvcc(tmp_path, "80 90", compiles=False), force=False)
    assert cmd.extensions == []  # nothing left for the editable install to copy
    assert not stale.exists()  # nor a module of an earlier build, as if this one had worked
    err = capsys.readouterr().err
    assert "could not build the CUDA extension" in err and "simulated failure" in err


def test_failed_build_with_force_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("AMVL_CUDA_ARCHS", raising=False)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _run_build_ext(tmp_path, _fake_nvcc(tmp_path, "80 90", compiles=False), force=True)
