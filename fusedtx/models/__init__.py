"""Models assembled from fusedtx layers: GPT (GPT-2 style) and its plain-PyTorch twin for comparison."""
from ._lm import CausalLM, Generation  # noqa: F401
from .gpt import GPT, GPTConfig  # noqa: F401
from .plain import PlainGPT  # noqa: F401
