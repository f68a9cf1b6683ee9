"""A decoder layer's whole decode step in one native call (`native/decode_layer.c`).

With a handful of rows a step, a layer's ≈60 tensor ops cost more in dispatch and Python than
in arithmetic (benchmarks/README.md). `attach_native_decode` gives each decoder layer a
`NativeDecodeLayer`: the pointers to its weights, gathered once into the C struct, so a pure
decode step (one new token per request, up to `decoder_layers.NATIVE_DECODE_MAX_ROWS`
requests) runs the layer as one call. Any other step (prefill, mixed, larger batches) runs the
module path, which stays the reference.

The native layer reads its projections' weights in place: int8 (`Int8Linear`), w8a8
(`W8A8Linear`) or plain bf16 (`Linear`); a layer with any other projection (int4,
oneDNN-packed, fp32) keeps the module path.
"""

import ctypes

import torch
from torch import nn

from enduro import native
from enduro.models.attention import Attention, KVCache
from enduro.models.attention_metadata import AttentionMetadata
from enduro.models.base import CausalLM
from enduro.models.decoder_layers import PreNormDecoderLayer, Rope, SandwichNormDecoderLayer
from enduro.models.fused import NATIVE_ACTIVATIONS
from enduro.models.layers import GatedMLP, Linear
from enduro.models.quantization import Int8Linear, W8A8Linear

_pointer, _i64, _i32, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class Projection(ctypes.Structure):
    _fields_ = [
        ("weight", _pointer),
        ("scales", _pointer),
        ("bias", _pointer),
        ("out", _i64),
        ("group", _i64),
    ]


class DecodeLayerStruct(ctypes.Structure):
    """`DecodeLayer` of decode_layer.c, field for field."""

    _fields_ = [
        *((name, _i64) for name in ("hidden", "num_heads", "num_kv_heads", "head_dim")),
        ("intermediate", _i64),
        ("rotary_dim", _i64),
        ("eps", _float),
        ("attn_scale", _float),
        *((name, _i32) for name in ("unit_offset", "sandwich", "activation", "interleaved")),
        *((name, _pointer) for name in ("input_norm", "post_attn_norm", "mlp_norm")),
        *((name, _pointer) for name in ("post_mlp_norm", "q_norm", "k_norm")),
        *((name, Projection) for name in ("qkv", "o", "gate_up", "down")),
    ]


class DecodeStepStruct(ctypes.Structure):
    """`DecodeStep` of decode_layer.c, field for field."""

    _fields_ = [
        ("k_cache", _pointer),
        ("v_cache", _pointer),
        ("block_size", _i64),
        ("slot_mapping", _pointer),
        ("tables", _pointer),
        ("table_width", _i64),
        *((name, _pointer) for name in ("table_starts", "key_starts", "seq_lens", "cos", "sin")),
    ]


def _projection(module: nn.Module) -> Projection | None:
    """The struct for an int8, w8a8 or plain bf16 projection; None for any other kind."""
    group = 0  # inputs per activation scale: w8a8 only
    if isinstance(module, Int8Linear):
        weight, scales, bias = module.weight, module.scales, module.bias
        out_features = weight.shape[0]
    elif isinstance(module, W8A8Linear):
        weight, scales, bias, group = module.packed, module.scales, module.bias, module.group
        out_features = module.out_features  # the packed weight's rows are padded to 16
    elif isinstance(module, Linear) and module.weight.dtype == torch.bfloat16:
        weight, scales, bias = module.weight, None, module.bias
        out_features = module.out_features
    else:
        return None
    if bias is not None and bias.dtype != torch.bfloat16:
        return None
    tensors = [t for t in (weight, scales, bias) if t is not None]
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        return None
    return Projection(
        weight.data_ptr(),
        scales.data_ptr() if scales is not None else None,
        bias.data_ptr() if bias is not None else None,
        out_features,
        group,
    )


def _norm_pointer(weight: torch.Tensor | None) -> int | None:
    if weight is None:
        return None
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        raise _Unsupported
    return weight.data_ptr()


class _Unsupported(Exception):
    """A layer the native decode cannot run (it keeps its module path)."""


class NativeDecodeLayer:
    """One decoder layer's weights as decode_layer.c's struct, and the call that runs it."""

    def __init__(
        self,
        library: native.Library,
        layer: PreNormDecoderLayer | SandwichNormDecoderLayer,
        rotary_dim: int,
    ) -> None:
        attn: Attention = layer.self_attn
        mlp: GatedMLP = layer.mlp
        found = [
            _projection(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        ]
        projections = [p for p in found if p is not None]
        if len(projections) < len(found) or mlp.act not in NATIVE_ACTIVATIONS:
            raise _Unsupported
        sandwich = isinstance(layer, SandwichNormDecoderLayer)
        norms = (
            (layer.input_norm, layer.post_attn_norm, layer.pre_mlp_norm, layer.post_mlp_norm)
            if isinstance(layer, SandwichNormDecoderLayer)
            else (layer.input_norm, None, layer.mlp_norm, None)
        )
        hidden = norms[0].weight.shape[0]
        self.library = library
        self.struct = DecodeLayerStruct(
            hidden,
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
            projections[2].out // 2,  # gate | up
            rotary_dim,
            norms[0].eps,
            attn.scale,
            int(norms[0].unit_offset),
            int(sandwich),
            NATIVE_ACTIVATIONS[mlp.act],
            int(attn.rope_interleaved),
            *(_norm_pointer(n.weight if n is not None else None) for n in norms),
            _norm_pointer(attn.q_norm.weight if attn.q_norm is not None else None),
            _norm_pointer(attn.k_norm.weight if attn.k_norm is not None else None),
            *projections,
        )
        self.pointer = ctypes.byref(self.struct)
        self.sliding_window = attn.sliding_window
        # The struct holds raw addresses: keep the tensors behind them alive with it, even if
        # a module were swapped out of the layer later.
        self.tensors = [t for t in layer.state_dict().values() if isinstance(t, torch.Tensor)]

    def __call__(
        self, x: torch.Tensor, rope: Rope, attn: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        x = x.contiguous()
        cos, sin = (t.float().contiguous() for t in rope)  # float32 [T, rotary_dim / 2]
        k_cache, v_cache = kv_cache
        window = self.sliding_window
        tables = attn.block_tables[window]
        step = DecodeStepStruct(
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.shape[1],
            attn.slot_mapping.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            attn.table_starts[window].data_ptr(),
            attn.key_starts[window].data_ptr(),
            attn.seq_lens.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
        )
        out = torch.empty_like(x)
        status = self.library.decode_layer(
            self.pointer, ctypes.byref(step), x.shape[0], x.data_ptr(), out.data_ptr()
        )
        if status != 0:
            raise MemoryError("native decode layer: scratch memory could not be allocated")
        return out


def attach_native_decode(model: CausalLM, library: native.Library | None) -> int:
    """Gives each decoder layer the layers can run natively a `NativeDecodeLayer` (its
    `native_decode`); returns how many. bf16 on CPU only; a layer it cannot take (another
    projection kind, activation or dtype) keeps None and its module path."""
    if library is None:
        return 0
    attached = 0
    for index, layer in enumerate(model.layers):
        if not isinstance(layer, PreNormDecoderLayer | SandwichNormDecoderLayer):
            continue
        layer.native_decode = None
        if layer.input_norm.weight.dtype != torch.bfloat16:
            continue
        try:
            layer.native_decode = NativeDecodeLayer(
                library, layer, model.arch.ropes[index].rotary_dim
            )
        except _Unsupported:
            continue
        attached += 1
    return attached
