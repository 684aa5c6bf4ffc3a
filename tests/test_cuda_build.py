"""The CUDA backend is really in the build when setup.py says it built it.

setup.py records its decision in ``tucker_ops/_build_info.py`` (``WITH_CUDA``).
Where CUDA was built, every op must have a CUDA kernel in the dispatcher: a
build that silently dropped csrc/cuda would otherwise pass every CPU test.
These tests need no GPU.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import tucker_ops._ops  # noqa: F401  (loads the library: registers the ops)

OPS = (
    "tucker_ops::tucker_conv2d",
    "tucker_ops::tucker_linear",
    "tucker_ops::tucker_conv2d_backward",
    "tucker_ops::tucker_linear_backward",
)


def _with_cuda() -> bool:
    try:
        info = importlib.import_module("tucker_ops._build_info")
    except ImportError:
        pytest.skip("tucker_ops/_build_info.py is missing: the extension was not built by setup.py")
    if not info.WITH_CUDA:
        reason = "torch is not a CUDA build" if torch.version.cuda is None else "TUCKER_OPS_CUDA=0 or no nvcc"
        pytest.skip(f"the extension was built without CUDA ({reason}): no CUDA kernels to look for")
    return True


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op: str) -> None:
    _with_cuda()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), (
        f"{op} has no CUDA kernel although setup.py built the extension with CUDA"
    )


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel_registered(op: str) -> None:
    # The CPU kernels are always built, with or without CUDA.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")



def _nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        pytest.skip("nvcc not found (set CUDA_HOME)")
    return found


def _compile_for_sm90(source: str, output: Path, *flags: str) -> subprocess.CompletedProcess:
    """nvcc on csrc/cuda/<source> for sm_90 with `flags` (-ptx, -cubin, ...) into `output`."""
    root = Path(__file__).resolve().parents[1]
    includes = [f"-I{p}" for p in [str(root / "csrc"), *cpp_extension.include_paths()]]
    cmd = [_nvcc(), *flags, "-arch=sm_90", "-std=c++20", "--expt-relaxed-constexpr", *includes,
           str(root / "csrc" / "cuda" / source), "-o", str(output)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tile_kernel_ptx(tmp_path_factory: pytest.TempPathFactory) -> str:
    """conv_fused_tc.cu compiled to PTX for sm_90 (no GPU needed; about 15 s)."""
    _with_cuda()
    ptx = tmp_path_factory.mktemp("ptx") / "conv_fused_tc.ptx"
    _compile_for_sm90("conv_fused_tc.cu", ptx, "-ptx")
    return ptx.read_text()


def _entries(ptx: str) -> dict[str, str]:
    """Each kernel's PTX body by its (mangled) name."""
    found = list(re.finditer(r"\.entry\s+(\w+)\s*\(", ptx))
    ends = [m.start() for m in found[1:]] + [len(ptx)]
    return {m.group(1): ptx[m.end():end] for m, end in zip(found, ends)}


def test_tensor_core_kernel_reads_shared_memory_in_the_shared_form(tile_kernel_ptx: str) -> None:
    """nvcc writes a WMMA load from shared memory in PTX's shared form for float16 only;
    for bfloat16 and TF32 it writes the generic form, which ptxas turns into one generic
    32-bit load per register instead of ldmatrix (benchmarks/RESULTS_GPU.md). So
    conv_fused_tc.cu writes those itself: every WMMA load and store in its PTX names
    the shared state space."""
    accesses = re.findall(r"wmma\.(?:load|store)\.[\w.]+", tile_kernel_ptx)
    for kind in ("load.a", "load.b"):
        for dtype in ("f16", "bf16", "tf32"):
            assert any(a.startswith(f"wmma.{kind}") and a.endswith(f".{dtype}") for a in accesses), (kind, dtype)
    generic = sorted({a for a in accesses if ".shared" not in a})
    assert not generic, f"WMMA accesses in the generic state space: {generic}"


def test_tensor_core_kernel_rounds_float32_operands_where_it_writes_them(tile_kernel_ptx: str) -> None:
    """The float32 tile kernels take operands already rounded to TF32 (by the packing
    kernel and their own spills), not converted after every fragment load: fewer
    conversions than tensor-core products in each variant (the previous version made
    eight per product: 560 against 70; benchmarks/RESULTS_GPU.md)."""
    kernels = {name: body for name, body in _entries(tile_kernel_ptx).items() if "fused_conv_tc_kernelIf" in name}
    assert len(kernels) == 2, sorted(kernels)  # the streaming and the resident variant
    for name, body in kernels.items():
        products, conversions = body.count("wmma.mma"), body.count("cvt.rna.tf32.f32")
        assert products > 0 and conversions < products, (name, conversions, products)
    packing = [body for name, body in _entries(tile_kernel_ptx).items() if "pack_tc_operands_kernelIf" in name]
    assert len(packing) == 1 and "cvt.rna.tf32.f32" in packing[0]


def test_tensor_core_kernel_moves_sixteen_bytes_per_lane(tile_kernel_ptx: str) -> None:
    """Step 3 writes eight output pixels of one channel per lane as 16-byte vectors
    (where W_out is a multiple of 8), and the spills of pj and z move 16 bytes per
    lane: every variant's PTX has both vector stores. The element-by-element
    versions spent most of a block's instructions there (benchmarks/RESULTS_GPU.md,
    run 8)."""
    kernels = {name: body for name, body in _entries(tile_kernel_ptx).items() if "fused_conv_tc_kernel" in name}
    assert len(kernels) == 6, sorted(kernels)  # float16, bfloat16, float32; streaming and resident
    for name, body in kernels.items():
        assert "st.global.cs.v4.u32" in body, name
        assert "st.shared.v4.u32" in body, name


def _spill_stores(source: str, tmp_path: Path) -> dict[str, int]:
    """ptxas's spill stores (bytes) per kernel of csrc/cuda/<source>, compiled for sm_90."""
    done = _compile_for_sm90(source, tmp_path / "kernel.cubin", "-cubin", "-Xptxas", "-v")
    found = re.findall(r"Function properties for (\w+)\s+\d+ bytes stack frame, (\d+) bytes spill stores",
                       done.stderr)
    return {name: int(stores) for name, stores in found}


@pytest.mark.parametrize("source, kernel", [("conv_grid.cu", "grid_conv_kernelIf"),
                                            ("linear_grid.cu", "grid_linear_kernelIf")])
def test_whole_gpu_kernels_float32_loads_each_tile_before_its_products(source: str, kernel: str,
                                                                       tmp_path: Path) -> None:
    """Loading every tile of a step ahead of its products (kLoadsAhead, grid_stage.cuh)
    made the float32 whole-GPU kernels 13-22% slower on the H200 while it helped
    float16 / bfloat16: float32 tiles take twice the registers, and the conv kernel's
    spill stores grew from 260 to 980 bytes (benchmarks/RESULTS_GPU.md, runs 8-9).
    float32 loads each tile just before its products, which keeps its spills small."""
    _with_cuda()
    spills = {name: stores for name, stores in _spill_stores(source, tmp_path).items() if kernel in name}
    assert len(spills) == 1, spills
    assert max(spills.values()) <= 256, spills


def test_tensor_core_kernel_has_narrow_output_runs(tile_kernel_ptx: str) -> None:
    """Step 3's trial narrow runs (TUCKER_OPS_CUDA_TC_NARROW_RUNS, W_out not a multiple
    of 8) store 4 and 2 pixels of a channel per instruction: 8- and 4-byte vector
    stores in 16-bit, 16- and 8-byte ones in float32, evict-first as the 8-pixel runs."""
    kernels = {name: body for name, body in _entries(tile_kernel_ptx).items() if "fused_conv_tc_kernel" in name}
    assert len(kernels) == 6, sorted(kernels)
    for name, body in kernels.items():
        wanted = (("st.global.cs.v4.f32", "st.global.cs.v2.f32") if "fused_conv_tc_kernelIf" in name
                  else ("st.global.cs.v2.u32", "st.global.cs.u32"))
        for store in wanted:
            assert re.search(re.escape(store) + r"\s", body), (name, store)
