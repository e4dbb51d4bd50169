"""Models assembled from fusedtx layers: GPT (GPT-2 style), Llama (Llama 3, Qwen 2 / 2.5 / 3,
Mistral, SmolLM2) and their plain-PyTorch twins for comparison."""
from ._lm import CausalLM, Generation  # noqa: F401
from .gpt import GPT, GPTConfig  # noqa: F401
from .llama import Llama, LlamaConfig  # noqa: F401
from .plain import PlainGPT, PlainLlama  # noqa: F401
