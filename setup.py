"""Install Symphony-MoE.

The C++/CUDA correlation extension (`symphony_kernels._C`) is built here when torch is importable
in the build environment (use `pip install --no-build-isolation .` after installing torch); the
CUDA sources are added when torch has CUDA and a toolkit is found. Switches:
  SYMPHONY_BUILD_EXT=0|1   skip / require the extension (default: build if torch is importable)
  SYMPHONY_BUILD_CUDA=0|1  skip / require the CUDA sources (default: build if CUDA is available)
Without a prebuilt extension, the first use JIT-builds it into a cache folder (see
symphony_kernels/_ext.py), and falls back to plain torch with a warning if that fails too.
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _flag(name):
    value = os.environ.get(name)
    return None if value is None or value == "" else value not in ("0", "false", "no")


def extensions():
    want = _flag("SYMPHONY_BUILD_EXT")
    if want is False:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if want:
            raise RuntimeError("SYMPHONY_BUILD_EXT=1 but torch is not importable in the build environment; "
                               "install torch first and use `pip install --no-build-isolation .`")
        return [], {}
    cpp = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    if not cpp:
        return [], {}
    cuda = _flag("SYMPHONY_BUILD_CUDA")
    if cuda is None:
        cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if cuda:
        ext = cpp_extension.CUDAExtension(
            "symphony_kernels._C", cpp + cu, define_macros=[("SYMPHONY_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("symphony_kernels._C", cpp, extra_compile_args=cxx,
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="symphony-moe",
    version="0.1.0",
    description="Kernel-backed Mixture-of-Experts runtime and Symphony-MoE model assembly",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ ships inside the wheel as symphony_kernels.csrc so that a JIT build works from any install.
    packages=find_packages(include=["symphony", "symphony.*", "symphony_kernels", "symphony_kernels.*"])
    + ["symphony_kernels.csrc"],
    package_dir={"symphony_kernels.csrc": "csrc"},
    package_data={"symphony_kernels.csrc": ["*.cpp", "*.cu", "*.h"], "symphony": ["data/*"]},
    install_requires=[
        "torch>=2.6",
        'triton>=3.2; platform_system == "Linux" and platform_machine == "x86_64"',
        "transformers>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "scipy>=1.10",
        "ninja",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["symphony=symphony.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
