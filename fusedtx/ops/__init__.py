"""torch.library ops ("fusedtx::<op>"): one module per op, imported here to register them."""
from . import activation, causal_attention, layer_norm, linear, log_softmax, rms_norm, rope, softmax  # noqa: F401
