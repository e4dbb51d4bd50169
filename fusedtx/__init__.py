"""fusedtx: deterministic, batch-invariant fused transformer kernels for PyTorch.

    import fusedtx
    y = fusedtx.softmax(x, dim=-1, scale=0.125, causal=True)
    with fusedtx.use_backend("reference"):
        y_spec = fusedtx.softmax(x, dim=-1, scale=0.125, causal=True)

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "native" (C++ CPU / CUDA, built
just in time on first use unless built ahead of time), "reference" (pure PyTorch, the spec).
"""
__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the fusedtx:: ops)
from . import functional, nn, reference  # noqa: F401
from .backends import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from .functional import (  # noqa: F401
    activation,
    attention_with_kv_cache,
    causal_attention,
    gelu_ffn,
    layer_norm,
    linear,
    log_softmax,
    rms_norm,
    rope,
    rope_table,
    softmax,
    swiglu_ffn,
)
from .config import get_split_size, set_split_size  # noqa: F401
from .convert import ConversionReport, convert  # noqa: F401
from .guard import guard  # noqa: F401
from .mode import batch_invariant_mode  # noqa: F401
from .info import info  # noqa: F401
