"""Models assembled from fusedtx layers: GPT (GPT-2 style) and its plain-PyTorch twin for comparison."""
from .gpt import GPT, GPTConfig, Generation  # noqa: F401
from .plain import PlainGPT  # noqa: F401
