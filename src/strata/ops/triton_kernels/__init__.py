"""Triton kernels, one per twin in `strata.ops.ref` (same names, same semantics).

Import this package only after deciding to use Triton (it imports triton). On CPU the kernels run under
`TRITON_INTERPRET=1`, which must be set before triton is first imported.
"""
from strata.ops.triton_kernels.activation import silu_and_mul
from strata.ops.triton_kernels.bitmask import apply_token_bitmask
from strata.ops.triton_kernels.cache import reshape_and_cache
from strata.ops.triton_kernels.decode_attention import paged_decode_attention
from strata.ops.triton_kernels.norm import fused_add_rms_norm, rms_norm
from strata.ops.triton_kernels.prefill_attention import paged_prefill_attention
from strata.ops.triton_kernels.epilogue import qkv_epilogue
from strata.ops.triton_kernels.fp8_gemm import fp8_quantize_act, fp8_supported, fp8_w8a8_linear, fp8_w8a16_linear
from strata.ops.triton_kernels.rotary import rotary_embedding

__all__ = [
    "apply_token_bitmask",
    "reshape_and_cache",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "qkv_epilogue",
    "fp8_w8a16_linear",
    "fp8_w8a8_linear",
    "fp8_quantize_act",
    "fp8_supported",
]
