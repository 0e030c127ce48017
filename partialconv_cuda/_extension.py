"""Loads the compiled library (partialconv_cuda._C), refusing one built for another torch."""
from pathlib import Path

import torch
from packaging.version import Version

_REBUILD = (
    "rebuild it against the torch you run with `pip install --no-build-isolation --no-deps "
    "--force-reinstall .` from the partialconv_cuda source directory"
)

try:
    from . import _build_info
except ImportError as error:  # a source checkout that was never built
    raise ImportError(
        f"partialconv_cuda is not built (no {__package__}._build_info next to {__file__}); "
        "install it with `pip install --no-build-isolation .`, and do not import it from inside "
        "the source directory, which shadows the installed package"
    ) from error

if Version(torch.__version__) != Version(_build_info.TORCH_VERSION):
    raise ImportError(
        f"partialconv_cuda was built against torch {_build_info.TORCH_VERSION}, but torch "
        f"{torch.__version__} is installed; {_REBUILD}"
    )

try:
    from . import _C  # noqa: F401  (registers the partialconv_cuda ops with the dispatcher)
except ImportError as error:
    package_dir = Path(__file__).resolve().parent
    if not any(package_dir.glob("_C.*")):
        raise ImportError(
            f"{package_dir} holds no compiled library: a source tree never built (`pip install "
            "--no-build-isolation -e .` builds it in place), or the source directory shadowing a "
            "package installed elsewhere (run Python from another directory)"
        ) from error
    raise ImportError(f"partialconv_cuda's compiled library failed to load ({error}); {_REBUILD}") from error

build_info = _build_info
