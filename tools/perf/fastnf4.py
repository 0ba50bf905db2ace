"""Faster pieces for single-GPU QLoRA (issue 13), our own code, kept outside the library until measured:

(a) `nf4_dequant_triton`: one Triton pass from packed NF4 codes + double-quantized block statistics to a bf16 (or fp16/fp32)
    weight, written into a caller's (reusable) buffer, bit-identical to `qlora_course.quant.dequantize_nf4`;
    `nf4_dequant_reference`: the same arithmetic, in the same order, in PyTorch (the fallback where Triton is absent);
    `patch_nf4linear`: NF4Linear's own matmul with that dequantization into one shared buffer per device.
(b) `chunked_lm_loss`: mean cross-entropy of `hidden @ W.T` computed chunk by chunk (fp32 log-sum-exp per row); backward
    recomputes each chunk's logits, so no (N, V) tensor ever exists.
(c) `LoRALinearBF16`: the LoRA branch in the compute dtype (bf16) with fp32 master weights: A and B are cast in forward,
    gradients reach the fp32 parameters through the cast.
"""
import math, os
import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton, triton.language as tl
except ImportError:                                    # a CPU-only install: the reference path is used instead
    triton = tl = None

from qlora_course.quant import NF4_CODE, DYNAMIC_CODE
from qlora_course.nf4_linear import NF4Linear
from qlora_course.lora import LoRALinear

# ----------------------------------------------------------------------------------------------------------------------
# (a) NF4 dequantization
# ----------------------------------------------------------------------------------------------------------------------
_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_tables = {}

def _code_tables(device):
    "NF4 (16) and dynamic 8-bit (256) code values as fp32 on `device`, cached"
    key = str(device)
    if key not in _tables: _tables[key] = (NF4_CODE.to(device), DYNAMIC_CODE.to(device))
    return _tables[key]

if triton is not None:
    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, nf4_ptr, dyn_ptr, out_ptr, n, n_bytes,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                            OUT_KIND: tl.constexpr, BYTES: tl.constexpr, FAULT: tl.constexpr):
        # One program: BYTES packed bytes -> 2*BYTES weights. Byte j holds element 2j (high nibble) and 2j+1 (low nibble);
        # both lie in block j // (BLOCKSIZE/2) since every block size is even.
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BYTES + tl.arange(0, BYTES)
        jm = j < n_bytes
        b = tl.load(packed_ptr + j, mask=jm, other=0).to(tl.int32)
        hi_i, lo_i = b >> 4, b & 15
        if FAULT == 1: hi_i, lo_i = lo_i, hi_i                                    # negative control: nibbles swapped
        hi = tl.load(nf4_ptr + hi_i)
        lo = tl.load(nf4_ptr + lo_i)
        blk = j // (BLOCKSIZE // 2)
        if DOUBLE_QUANT:
            # absmax = dynamic_code[q] * absmax2[blk // 256] + offset: a product rounded to fp32, then a sum rounded to fp32
            # (as dequantize_blockwise(...) + offset computes it); the launch sets enable_fp_fusion=False so that the GPU
            # compiler does not contract the two into one FMA (one rounding), which would change the last bit
            q = tl.load(absmax_ptr + blk, mask=jm, other=0).to(tl.int32)
            a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=jm, other=0.0)
            c2 = tl.load(dyn_ptr + q)
            off = tl.load(offset_ptr)
            if FAULT == 3: scale = tl.fma(c2, a2, off)                              # negative control: one rounding
            else: scale = c2 * a2 + off
        else:
            scale = tl.load(absmax_ptr + blk, mask=jm, other=0.0)
        w_hi = hi * scale
        w_lo = lo * scale
        if OUT_KIND == 0:
            if FAULT == 2:                                                          # negative control: truncating cast
                h16 = (w_hi.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
                l16 = (w_lo.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
            else:
                # fp32 -> bf16 rounded to nearest even, by integer arithmetic: the same bits on the GPU and in the
                # interpreter (whose own fp32->bf16 cast truncates); NaN -> 0x7FC0 as PyTorch's CPU conversion gives
                uh = w_hi.to(tl.uint32, bitcast=True)
                ul = w_lo.to(tl.uint32, bitcast=True)
                h16 = ((uh + 0x7FFF + ((uh >> 16) & 1)) >> 16).to(tl.uint16)
                l16 = ((ul + 0x7FFF + ((ul >> 16) & 1)) >> 16).to(tl.uint16)
                h16 = tl.where(w_hi != w_hi, 0x7FC0, h16).to(tl.uint16)
                l16 = tl.where(w_lo != w_lo, 0x7FC0, l16).to(tl.uint16)
            w = tl.interleave(h16, l16).to(tl.bfloat16, bitcast=True)
        elif OUT_KIND == 1:
            w = tl.interleave(w_hi.to(tl.float16), w_lo.to(tl.float16))
        else:
            w = tl.interleave(w_hi, w_lo)
        e = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + e, w, mask=e < n)

def _check_args(packed, absmax, absmax2, offset, blocksize, n, out_dtype):
    if out_dtype not in _OUT_KIND: raise TypeError(f'out_dtype must be one of {list(_OUT_KIND)}, got {out_dtype}')
    if blocksize % 2: raise ValueError(f'blocksize must be even, got {blocksize}')
    if packed.numel() != (n + 1) // 2: raise ValueError(f'{n} weights need {(n + 1) // 2} packed bytes, got {packed.numel()}')
    if absmax.numel() != -(-n // blocksize): raise ValueError(f'{n} weights need {-(-n // blocksize)} blocks of {blocksize}, got {absmax.numel()}')
    if absmax2 is not None and (absmax.dtype != torch.uint8 or offset is None):
        raise ValueError('double quantization: absmax must be the uint8 codes, with absmax2 and offset')

def _out_view(out, n, dtype, device):
    if out is None: return torch.empty(n, dtype=dtype, device=device)
    if out.dtype != dtype or out.device != device or not out.is_contiguous() or out.numel() < n:
        raise ValueError(f'out must be a contiguous {dtype} tensor on {device} of at least {n} elements, got {out.dtype} {tuple(out.shape)} on {out.device}')
    return out.view(-1)[:n]

def nf4_dequant_triton(packed, absmax, absmax2, offset, blocksize=64, n=None, out_dtype=torch.bfloat16, out=None,
                       blocksize2=256, _fault=0, _bytes_per_program=1024):
    """Dense weights (1-D, `n` of them) from packed NF4 bytes and their block statistics, in one Triton pass.

    packed: uint8 (n+1)//2 bytes (high nibble first); absmax: uint8 codes of the block scales (double quantization, with
    fp32 `absmax2` per `blocksize2` blocks and the fp32 `offset`, a 0-d or 1-element tensor) or fp32 scales (absmax2=None).
    out: an optional contiguous buffer of at least n elements of `out_dtype`, written in place (its first n elements are
    returned). Bit-identical to `dequantize_nf4(packed, stats, shape, out_dtype)`."""
    if triton is None: raise ImportError('nf4_dequant_triton needs triton (use nf4_dequant_reference without it)')
    n = packed.numel() * 2 if n is None else n
    packed = packed.reshape(-1).view(torch.uint8)
    _check_args(packed, absmax.reshape(-1), absmax2, offset, blocksize, n, out_dtype)
    res = _out_view(out, n, out_dtype, packed.device)
    nf4, dyn = _code_tables(packed.device)
    dq = absmax2 is not None
    absmax = absmax.reshape(-1)
    a2 = absmax2.reshape(-1) if dq else absmax
    off = offset.reshape(-1) if dq else absmax
    nb = packed.numel()
    grid = (triton.cdiv(nb, _bytes_per_program),)
    kw = dict(BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, DOUBLE_QUANT=dq, OUT_KIND=_OUT_KIND[out_dtype], BYTES=_bytes_per_program, FAULT=_fault)
    global _fp_fusion_kw
    try: _nf4_dequant_kernel[grid](packed, absmax, a2, off, nf4, dyn, res, n, nb, **kw, **_fp_fusion_kw)
    except (TypeError, KeyError) as e:
        if not _fp_fusion_kw or 'enable_fp_fusion' not in str(e): raise
        _fp_fusion_kw = {}                              # a Triton without the launch option: contraction may change fp32 outputs' last bit
        _nf4_dequant_kernel[grid](packed, absmax, a2, off, nf4, dyn, res, n, nb, **kw)
    return res

_fp_fusion_kw = dict(enable_fp_fusion=False)

def nf4_dequant_reference(packed, absmax, absmax2, offset, blocksize=64, n=None, out_dtype=torch.bfloat16, out=None, blocksize2=256):
    "The kernel's arithmetic, in the same order, in PyTorch (per-block scale, then code * scale rounded once to out_dtype)"
    n = packed.numel() * 2 if n is None else n
    packed = packed.reshape(-1).view(torch.uint8)
    _check_args(packed, absmax.reshape(-1), absmax2, offset, blocksize, n, out_dtype)
    nf4, dyn = _code_tables(packed.device)
    if absmax2 is not None:
        blk = torch.arange(absmax.numel(), device=packed.device)
        scale = dyn[absmax.reshape(-1).long()] * absmax2.reshape(-1)[blk // blocksize2]
        scale = scale + offset.reshape(-1)[0]
    else: scale = absmax.reshape(-1).float()
    b = packed.long()
    codes = torch.stack([nf4[b >> 4], nf4[b & 15]], 1).view(-1)[:n]
    w = codes * scale.repeat_interleave(blocksize)[:n]
    res = _out_view(out, n, out_dtype, packed.device)
    res.copy_(w)                                        # fp32 -> out_dtype, rounded to nearest even
    return res

def nf4_dequant(packed, absmax, absmax2, offset, blocksize=64, n=None, out_dtype=torch.bfloat16, out=None):
    "The Triton kernel where it can run (CUDA, or TRITON_INTERPRET=1 on CPU), else the PyTorch reference"
    if triton is not None and (packed.is_cuda or os.environ.get('TRITON_INTERPRET') == '1'):
        return nf4_dequant_triton(packed, absmax, absmax2, offset, blocksize, n, out_dtype, out)
    return nf4_dequant_reference(packed, absmax, absmax2, offset, blocksize, n, out_dtype, out)

def dequant_impl():
    "Which implementation `nf4_dequant` uses on a CUDA tensor here"
    return 'triton' if triton is not None else 'torch-reference'

# One buffer per (device, dtype), grown to the largest weight seen: every NF4 matmul consumes its dense weight before the
# next dequantization is queued on the same stream, so one buffer serves all layers, in forward and in backward.
_buffers = {}

def shared_buffer(device, dtype, n):
    key = (str(device), dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        _buffers[key] = buf = torch.empty(n, dtype=dtype, device=device)
    return buf

def fast_dequantize(layer, storage, dtype):
    "`layer`'s dense weight (out, in) in `dtype`, dequantized into the shared buffer (valid until the next call)"
    packed, stats = layer._unpack(storage)
    n = layer.out_features * layer.in_features
    buf = shared_buffer(packed.device, dtype, n)
    w = nf4_dequant(packed, stats.absmax, stats.absmax2, stats.offset, stats.blocksize, n, dtype, out=buf)
    return w.view(layer.out_features, layer.in_features)

def _fast_dequantize(self, storage, dtype):
    "NF4Linear._dequantize, the one its matmul (`nf4_linear._NF4Matmul`) calls in forward and backward, through `fast_dequantize`"
    return fast_dequantize(self, storage, dtype)

def patch_nf4linear():
    """Make every NF4Linear's matmul (the library's own `_NF4Matmul`, forward and backward) dequantize with `nf4_dequant`
    into the shared buffer; the public `dequantize()` keeps returning fresh tensors. Returns an undo function"""
    old_private, old_public = NF4Linear._dequantize, NF4Linear.dequantize
    def dequantize(self, dtype=None): return old_private(self, self._storage(), dtype or self.compute_dtype)
    dequantize.__doc__ = old_public.__doc__
    NF4Linear._dequantize, NF4Linear.dequantize = _fast_dequantize, dequantize
    def undo(): NF4Linear._dequantize, NF4Linear.dequantize = old_private, old_public
    return undo

# ----------------------------------------------------------------------------------------------------------------------
# (b) chunked cross-entropy fused with the output projection
# ----------------------------------------------------------------------------------------------------------------------
def default_chunk(vocab, budget=2**25):
    "Rows per chunk so that a chunk's logits hold about `budget` values (256 rows for a 128,256-word vocabulary)"
    return max(64, budget // vocab // 64 * 64)

def _acc_dtype(dtype): return torch.promote_types(dtype, torch.float32)

class ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, ignore_index):
        N, acc = hidden.shape[0], _acc_dtype(hidden.dtype)
        valid = labels != ignore_index
        n_valid = valid.sum()
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            logits = (hidden[s:e] @ weight.t()).to(acc)             # as lm_head then .float(): the matmul in the input dtype
            l = torch.logsumexp(logits, -1)
            tgt = logits.gather(1, labels[s:e].clamp(min=0)[:, None]).squeeze(1)
            total += torch.where(valid[s:e], l - tgt, 0).sum()
            lse[s:e] = l
            del logits
        ctx.chunk, ctx.ignore_index = chunk, ignore_index
        ctx.save_for_backward(hidden, weight, labels, lse, n_valid)
        return total / n_valid                                     # all ignored: 0/0 = nan, as F.cross_entropy gives

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, lse, n_valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, acc = hidden.shape[0], lse.dtype
        valid = labels != ctx.ignore_index
        scale = (g / n_valid).to(acc)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, N, ctx.chunk):
            e = min(s + ctx.chunk, N)
            h = hidden[s:e]
            p = (h @ weight.t()).to(acc)                           # the chunk's logits again
            p.sub_(lse[s:e, None]).exp_()                          # softmax
            rows = torch.arange(e - s, device=p.device)
            m = valid[s:e].to(acc)
            p.index_put_((rows, labels[s:e].clamp(min=0)), -m, accumulate=True)   # minus the one-hot target (valid rows)
            p.mul_((scale * m)[:, None])                           # d loss / d logits; ignored rows get 0
            d = p.to(hidden.dtype)
            del p
            if need_h: grad_h[s:e] = d @ weight
            if need_w: grad_w += (d.t() @ h).to(acc)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None

def chunked_lm_loss(hidden, lm_head_weight, labels, chunk=None, ignore_index=-100):
    """Mean cross-entropy of the logits `hidden @ lm_head_weight.T` (N, V) against `labels` (N,), ignoring `ignore_index`,
    computed `chunk` rows at a time: the same as F.cross_entropy((hidden @ W.T).float(), labels), but neither the logits
    nor their gradient ever exist for all N rows at once (backward recomputes each chunk's logits)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f'hidden must be (N, d) and labels (N,), got {tuple(hidden.shape)} and {tuple(labels.shape)}')
    chunk = chunk or default_chunk(lm_head_weight.shape[0])
    return ChunkedLMLoss.apply(hidden, lm_head_weight, labels, chunk, ignore_index)

def causal_lm_chunked_loss(model, batch, chunk=None):
    "A `core.train_steps` loss_fn: the decoder's last hidden states, then `chunked_lm_loss` with the output layer (labels shifted as HF does)"
    out = model.model(input_ids=batch['input_ids'], attention_mask=batch.get('attention_mask'))
    h = out.last_hidden_state if hasattr(out, 'last_hidden_state') else out[0]
    labels = batch['labels']
    shifted = F.pad(labels[:, 1:], (0, 1), value=-100)               # predict token t+1 at t; the last position scores nothing
    head = model.get_output_embeddings()
    if getattr(head, 'bias', None) is not None: raise NotImplementedError('an output layer with a bias')
    return chunked_lm_loss(h.reshape(-1, h.shape[-1]), head.weight, shifted.reshape(-1), chunk)

# ----------------------------------------------------------------------------------------------------------------------
# (c) LoRA branch in the compute dtype, fp32 master weights
# ----------------------------------------------------------------------------------------------------------------------
class LoRALinearBF16(LoRALinear):
    "LoRALinear whose update runs in the base output's dtype: A, B (fp32 parameters) are cast each forward; y + s*(xA^T)B^T in one addmm"
    def forward(self, x):
        y = self.base_layer(x)
        if self.merged: return y
        dt = y.dtype
        h = F.linear(self.lora_dropout(x.to(dt)), self.lora_A.weight.to(dt))
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.weight.to(dt).t(), alpha=self.scaling)
        return out.view(y.shape)

def use_bf16_lora(model):
    "Switch every plain LoRALinear of `model` to `LoRALinearBF16` (same parameters, same state dict); returns how many"
    k = 0
    for m in model.modules():
        if type(m) is LoRALinear: m.__class__ = LoRALinearBF16; k += 1
    return k
