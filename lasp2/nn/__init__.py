"""nn.Modules for linear-attention and hybrid models. Single-device modules: an attention module
becomes sequence-parallel only when ``lasp2.parallelize`` gives it an :class:`SPContext`."""
from .context import SPContext, token_positions
from .feature_maps import ReBasedFeatureMap, TaylorFeatureMap
from .linear_attention import DELTA_VARIANTS, LINEAR_VARIANTS, LinearAttention
from .mlp import SwiGLU
from .norm import RMSNorm
from .softmax_attention import SoftmaxAttention

__all__ = ["LinearAttention", "SoftmaxAttention", "RMSNorm", "SwiGLU", "SPContext", "TaylorFeatureMap",
           "ReBasedFeatureMap", "LINEAR_VARIANTS", "DELTA_VARIANTS", "token_positions"]
