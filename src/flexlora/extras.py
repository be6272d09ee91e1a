"""Optional dependencies: each feature that needs a package beyond the core install names the
extra that brings it (`pip install 'flexlora[flower]'`), as one line; and bitsandbytes stays
out of every process that quantizes nothing.

A leaf module (standard library and flexlora.errors only), so that any module can check for
its optional packages before importing them."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from contextlib import contextmanager

from flexlora.errors import ConfigError

# import name -> (distribution to install, extra of flexlora that declares it)
EXTRAS = {
    "flwr": ("flwr", "flower"),
    "cryptography": ("cryptography", "flower"),
    "ray": ("flwr[simulation]", "simulation"),
    "bitsandbytes": ("bitsandbytes", "nf4"),
    "psutil": ("psutil", "bench"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow-skinny", "mlflow"),
    "wandb": ("wandb", "wandb"),
    "datasets": ("datasets", "hf"),
    "flwr_datasets": ("flwr-datasets", "hf"),
    "lm_eval": ("lm-eval", "lmeval"),
    "dp_accounting": ("dp-accounting", "privacy"),
}


class MissingDependency(ConfigError, ImportError):
    """A feature's optional package is not installed: one line (exit code 2 on the command line)
    that names the extra to install. Also an ImportError, for code that imports flexlora."""


def missing(module: str, feature: str) -> MissingDependency:
    distribution, extra = EXTRAS[module]
    error = MissingDependency(f"{feature} needs the package {distribution}: pip install 'flexlora[{extra}]'")
    error.name = module
    return error


def require(module: str, feature: str) -> None:
    """Raise MissingDependency unless `module` (a key of EXTRAS) can be imported."""
    if importlib.util.find_spec(module) is None:
        raise missing(module, feature)


@contextmanager
def quiet_peft():
    """PEFT imported or wrapping a model without side effects a run does not ask for: without
    bitsandbytes unless a 4-bit model already loaded it, and without a deprecation warning that
    only PEFT can act on.

    PEFT imports bitsandbytes whenever it is installed: at `import peft` (peft.helpers) and each
    time it wraps layers (its LoRA dispatch looks for 8-bit and 4-bit layers). Importing
    bitsandbytes costs over a second (it imports torch's inductor) and, on CPUs with
    AVX512-BF16, logs a kernel warning on every run, though nothing is quantized. Inside this
    block `import bitsandbytes` fails and `find_spec` finds nothing, which PEFT reads as "not
    installed"; afterwards PEFT's cached answers are dropped, so a 4-bit model loaded later in
    the same process (models.load_model with quantization="nf4" imports bitsandbytes first)
    gets PEFT's 4-bit layers as usual.

    PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` each time it wraps a
    model (PeftModel.__init__), a FutureWarning on every run; it is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if "bitsandbytes" in sys.modules:  # loaded (a 4-bit model in this process): nothing to hide
            yield
            return
        sys.modules["bitsandbytes"] = None  # the import system's marker for "cannot be imported"
        try:
            yield
        finally:
            if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
                del sys.modules["bitsandbytes"]
            _forget_peft_bitsandbytes_checks()


def _forget_peft_bitsandbytes_checks() -> None:
    peft_imports = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        check = getattr(peft_imports, name, None)
        if hasattr(check, "cache_clear"):
            check.cache_clear()


def give_peft_bitsandbytes(bitsandbytes) -> None:
    """After bitsandbytes is imported for a 4-bit model: hand it to the PEFT helper module that
    looked for it while it was hidden (peft.helpers keeps `bnb = None` from its import)."""
    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", bitsandbytes) is None:
        helpers.bnb = bitsandbytes
