"""The ZAYA1 "MoE++" decoder, weight-compatible with the Hugging Face checkpoint `Zyphra/ZAYA1-8B`.

Follows the ZAYA1-8B technical report (arXiv 2605.05365, section II-A) and the native transformers layout
(`models/zaya`), whose parameter names we keep exactly so checkpoints load either way:

- fp32 residual stream, entered through a learned per-channel bias and scale (no sqrt(D) multiplier);
- Compressed Convolutional Attention (CCA): q/k projections, the QK-mean skip terms, a depthwise then a
  head-grouped causal convolution over (q, k), value heads split into a current and a one-token-delayed half,
  L2 QK-norm to sqrt(head_dim) with a learned per-KV-head key temperature, RoPE on half of each head, GQA,
  optional sliding window (`hybrid_sliding` layers);
- the ZAYA router: down-projection, exponential depth averaging (EDA) of the router latent across blocks,
  RMSNorm + 3-layer GELU MLP over E experts plus one skip class, fp32 softmax, top-1 on probabilities plus
  balancing biases, un-renormalised combine weight, skip = no expert output (mixture of depths);
- SwiGLU experts stored as `gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`;
- two learned residual-scaling merges per block; final RMSNorm; LM head tied to the embedding.

What we do differently from the reference (same numbers, less work):
- Experts run grouped: tokens are sorted by expert and each expert runs once on its contiguous slice.
  Tokens routed to skip (and padding) are never computed; the reference sends them through expert 0 with weight 0.
- Attention uses SDPA's causal kernel when there is no padding and no window, and a boolean mask otherwise.
- The decode cache is preallocated (`ZayaCache`), one row per sequence slot, with per-row write positions,
  so the engine can run continuous batching without reallocating.
- Training scores tokens through `token_logprobs`: an fp32 LM head that works on chunks of rows when the logits
  would exceed 256 MB, so the [B, T, V] logits (V = 262K for the released model) never exist at once.
- Under `torch.compile` (the engine's compiled decode) the experts are one opaque custom op (`openzaya::experts`).

Training-only pieces (each tested): bias balancing by the report's eq. 5 (`update_balancing_biases`),
router replay (`forward(..., replay_routes=...)`, `return_routes=True`), and per-layer expert-load statistics.
NOTE: route index -1 is the sentinel for "no expert" (skip class or padding), never expert 0. In replayed routes,
-2 (`ZERO_OR_SKIP`) means "expert 0 or the skip class": vLLM reports a skipped token as expert 0 with weight 0 and
returns only the ids, so the router takes whichever of the two it scores higher (rl.routes_from_server).

Shape legend: B batch rows, T new tokens, S cached positions, D hidden, H query heads, K kv heads,
Dh head dim, C conv channels (=(H+K)*Dh), R router latent, E experts, I expert intermediate, N = B*T tokens, V vocab.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# -----------------------------------------------------------------------------
# Config

LAYER_TYPES = ("hybrid", "hybrid_sliding")


def _default_rope_parameters() -> dict:
    return {
        "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
    }


@dataclass
class ZayaConfig:
    """Mirrors the native Hugging Face `config.json` (`model_type: "zaya"`). Small defaults; presets below."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    moe_intermediate_size: int = 64
    num_experts: int = 4
    num_experts_per_tok: int = 1
    router_hidden_size: int = 16
    cca_time0: int = 2
    cca_time1: int = 2
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    rope_parameters: dict = field(default_factory=_default_rope_parameters)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    lm_head_bias: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 106
    pad_token_id: int | None = 0
    dtype: str = "float32"

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = ["hybrid"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        self.validate()

    def validate(self):
        def bad(field_name, why):
            raise ValueError(f"ZayaConfig.{field_name}: {why}")

        if self.num_experts_per_tok != 1:
            bad("num_experts_per_tok", f"ZAYA1 routes top-1; got {self.num_experts_per_tok} (unsupported)")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}")
        if self.num_key_value_heads * self.head_dim % 2:
            bad("head_dim", "num_key_value_heads * head_dim must be even (current/delayed value halves)")
        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", f"has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                bad("layer_types", f"unknown layer type {t!r} (expected one of {LAYER_TYPES})")
            if t not in self.rope_parameters:
                bad("rope_parameters", f"no entry for layer type {t!r}")
            if self.rope_parameters[t].get("rope_type", "default") != "default":
                bad("rope_parameters", f"rope_type {self.rope_parameters[t]['rope_type']!r} is unsupported")
        if "hybrid_sliding" in self.layer_types and not self.sliding_window:
            bad("sliding_window", "must be set when layer_types contains 'hybrid_sliding'")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' experts are supported, got {self.hidden_act!r}")
        if self.attention_bias:
            bad("attention_bias", "biased q/k/v projections are unsupported (ZAYA1 has none)")
        if self.lm_head_bias:
            bad("lm_head_bias", "an LM-head bias is unsupported (ZAYA1 has none)")
        if self.cca_time0 < 1 or self.cca_time1 < 1:
            bad("cca_time0", "convolution kernel sizes must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad("dtype", f"unsupported dtype {self.dtype!r}")

    # --- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ZayaConfig":
        if d.get("model_type", "zaya") != "zaya":
            raise ValueError(f"config.json: model_type is {d.get('model_type')!r}, expected 'zaya'")
        if "zaya_layers" in d or "ffn_hidden_size" in d:
            raise ValueError("config.json: this is the legacy (Megatron-style) ZAYA layout; "
                             "only the native layout (layer_types, moe_intermediate_size) is supported")
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("dtype") is None:
            kw["dtype"] = d.get("torch_dtype") or "float32"
        kw["dtype"] = str(kw["dtype"]).replace("torch.", "")
        if "rope_parameters" in kw and kw["rope_parameters"] is not None:
            rope = {k: dict(v) for k, v in kw["rope_parameters"].items() if isinstance(v, dict)}
            kw["rope_parameters"] = {**_default_rope_parameters(), **rope}
        elif "rope_theta" in d:  # flat legacy-style rope fields
            rope = _default_rope_parameters()
            rope["hybrid"]["rope_theta"] = float(d["rope_theta"])
            kw["rope_parameters"] = rope
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(model_type="zaya", architectures=["ZayaForCausalLM"], num_experts_per_tok=1)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "ZayaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))

    def save(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # --- derived ----------------------------------------------------------------------------------
    @property
    def conv_channels(self) -> int:
        return (self.num_attention_heads + self.num_key_value_heads) * self.head_dim

    @property
    def conv_state_len(self) -> int:
        return (self.cca_time0 - 1) + (self.cca_time1 - 1)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# Presets are plain functions returning the dataclass.
def nano(vocab_size: int = 2048) -> ZayaConfig:
    """~2M parameters: the CPU speedrun model."""
    return ZayaConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, num_experts=4,
                      router_hidden_size=32, max_position_embeddings=2048)


def mini(vocab_size: int = 2048) -> ZayaConfig:
    """nano at 1.5x the width (hidden 192, 6 heads): the ~20-minute CPU speedrun model (speedrun.mini)."""
    return ZayaConfig(vocab_size=vocab_size, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=192, num_experts=4,
                      router_hidden_size=32, max_position_embeddings=2048)


def micro(vocab_size: int = 8192) -> ZayaConfig:
    """~20M parameters (the benchmark size of bench/model.py)."""
    return ZayaConfig(vocab_size=vocab_size, hidden_size=256, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=32, moe_intermediate_size=256, num_experts=16,
                      router_hidden_size=64, max_position_embeddings=4096)


def zaya1_8b() -> ZayaConfig:
    """The released Zyphra/ZAYA1-8B configuration (native layout)."""
    return ZayaConfig(vocab_size=262272, hidden_size=2048, num_hidden_layers=40, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=128, moe_intermediate_size=2048, num_experts=16,
                      router_hidden_size=256, max_position_embeddings=131072, dtype="bfloat16")


PRESETS = {"nano": nano, "mini": mini, "micro": micro, "zaya1_8b": zaya1_8b}


# -----------------------------------------------------------------------------
# Decode cache


class ZayaCache:
    """Preallocated per-layer decode state for `rows` sequence slots of up to `max_len` positions.

    Per layer: keys/values [B, K, S, Dh] (model dtype), the last `conv_state_len` pre-convolution qk columns
    [B, cs, C] (transformers keeps them as [B, C, cs]) and the previous token's delayed value [B, K*Dh/2] (both fp32, as the report keeps CCA state).
    Per row: `write_B` (next cache index), `pos_B` (next RoPE position = real tokens seen), `valid_BS`
    (which cache positions hold real tokens; left padding is written but never attended to).
    `rows(i, j)` returns a view over slots i..j-1 that writes through to this cache (used by the engine to
    prefill one slot while others decode).
    """

    def __init__(self, config: ZayaConfig, batch_size: int, max_len: int, device=None, dtype=None, _views=None):
        if _views is not None:
            self.__dict__.update(_views)
            return
        dtype = dtype or config.torch_dtype
        L, B, K, Dh = config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim
        self.max_len = max_len
        self.k = [torch.zeros(B, K, max_len, Dh, device=device, dtype=dtype) for _ in range(L)]
        self.v = [torch.zeros(B, K, max_len, Dh, device=device, dtype=dtype) for _ in range(L)]
        self.conv = [torch.zeros(B, config.conv_state_len, config.conv_channels, device=device) for _ in range(L)]
        self.vdel = [torch.zeros(B, K * Dh // 2, device=device) for _ in range(L)]
        self.write_B = torch.zeros(B, dtype=torch.long, device=device)
        self.pos_B = torch.zeros(B, dtype=torch.long, device=device)
        self.valid_BS = torch.zeros(B, max_len, dtype=torch.bool, device=device)

    @property
    def batch_size(self) -> int:
        return self.write_B.shape[0]

    def rows(self, i: int, j: int) -> "ZayaCache":
        """A view of slots [i, j): writes go to this cache's storage."""
        sl = slice(i, j)
        views = dict(max_len=self.max_len, k=[t[sl] for t in self.k], v=[t[sl] for t in self.v],
                     conv=[t[sl] for t in self.conv], vdel=[t[sl] for t in self.vdel],
                     write_B=self.write_B[sl], pos_B=self.pos_B[sl], valid_BS=self.valid_BS[sl])
        return ZayaCache(None, 0, 0, _views=views)

    def reset(self, rows: slice | list[int] | None = None):
        """Clear the given slots (all if None) so a new sequence can start there."""
        rows = slice(None) if rows is None else rows
        for t in self.conv + self.vdel:
            t[rows] = 0
        self.write_B[rows] = 0
        self.pos_B[rows] = 0
        self.valid_BS[rows] = False

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.conv + self.vdel)


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # NOTE: normalise in fp32 whatever the input dtype, then return in the weight's dtype (as HF-mod).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(self.weight.dtype)


def rope_cos_sin(positions_BT, head_dim, rope: dict, dtype):
    """Tables [B, 1, T, Dh] for partial rotary embedding on the first `rot` dims, rotate-half style:
    x_out = x * cos + swap(x) * sin, where swap exchanges the two halves of the rotary dims, cos = 1 and sin = 0 on the
    pass-through dims and the rotate-half sign is folded into sin. Returns (cos, sin, rot)."""
    rot = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    dev = positions_BT.device
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32, device=dev) / rot))
    freqs_BTf = positions_BT[..., None].float() * inv_freq
    emb = torch.cat((freqs_BTf, freqs_BTf), dim=-1)[:, None]
    half, rest = rot // 2, head_dim - rot
    cos = torch.cat((emb.cos(), emb.new_ones(*emb.shape[:-1], rest)), dim=-1)
    sin = torch.cat((-emb[..., :half].sin(), emb[..., half:].sin(), emb.new_zeros(*emb.shape[:-1], rest)), dim=-1)
    return cos.to(dtype), sin.to(dtype), rot


def apply_rope(x_BHTd, rope_tables):
    # one cat of three slices: 4x faster than an index_select over the last dim (fwd + bwd 5.1 vs 9.1 ms at B8 T512)
    cos, sin, rot = rope_tables
    half = rot // 2
    swapped = torch.cat((x_BHTd[..., half:rot], x_BHTd[..., :half], x_BHTd[..., rot:]), dim=-1)
    return x_BHTd * cos + swapped * sin


def _frozen(module: nn.Module, key: str, params, build):
    """`build()` cached on the module while gradients are off and `params` are unchanged (version counters), so
    decode steps reuse derived weights (composed convolution, fused projections). With grad on: always rebuilt."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():   # compiled: rebuilt inside the graph
        return build()
    stamp = tuple((p.data_ptr(), p._version) for p in params)
    cache = module.__dict__.setdefault("_frozen", {})
    if key not in cache or cache[key][0] != stamp:
        cache[key] = (stamp, build())
    return cache[key][1]


class CCAProjection(nn.Module):
    """q, k, v of Compressed Convolutional Attention (TR App. C): conv-mixed q/k plus QK-mean skips, delayed v.

    The depthwise (kernel k0) then head-grouped (kernel k1) convolutions are linear, so we run them as ONE
    head-grouped causal convolution of kernel k0 + k1 - 1 whose weights and bias are composed from the two stored
    convolutions at every call (exact up to float summation order; gradients reach the stored weights). It runs as
    one grouped `conv1d` for prefill and training (isolated, forward + backward at B8 T512 on this CPU: 29 ms per
    layer vs 49 ms for stacking the taps into a batched matmul; whole nano training step 1.05-1.14x, bench-config
    prefill 1.03x) and as a batched matmul over the stacked taps for one-token decode, where conv1d's call costs
    more. Packed documents (`docpos_BT`): the few outputs whose taps reach into the previous document are corrected
    afterwards (`drop_cross_document_taps`).
    """

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        D, H, K, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.K, self.Dh, self.cs = H, K, Dh, cfg.conv_state_len
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, K * Dh, bias=False)
        self.v_proj_current = nn.Linear(D, K * Dh // 2, bias=False)
        self.v_proj_delayed = nn.Linear(D, K * Dh // 2, bias=False)
        C = cfg.conv_channels
        self.conv_qk_depthwise = nn.Conv1d(C, C, kernel_size=cfg.cca_time0, groups=C)
        self.conv_qk_grouped = nn.Conv1d(C, C, kernel_size=cfg.cca_time1, groups=H + K)

    def composed_conv(self):
        """Weights [C, Dh_in, taps] (conv1d layout, G groups) and bias [C] of grouped(depthwise(x)) as one
        convolution."""
        wd_Ck0 = self.conv_qk_depthwise.weight[:, 0]                      # (C, k0)
        wg_CDk1 = self.conv_qk_grouped.weight                              # (C, Dh_in, k1)
        G, Dh = self.H + self.K, self.Dh
        k0, k1 = wd_Ck0.shape[-1], wg_CDk1.shape[-1]
        wd_GDk0 = wd_Ck0.view(G, 1, Dh, k0)                                # input channel m of group g
        wg = wg_CDk1.view(G, Dh, Dh, k1)                                   # (G, out, in, k1)
        w = wg.new_zeros(G, Dh, Dh, k0 + k1 - 1)
        for j in range(k1):                                                # tap s = i + j
            w[..., j:j + k0] += wg[..., j:j + 1] * wd_GDk0
        bias = self.conv_qk_grouped.bias + torch.einsum("godj,gd->go", wg, self.conv_qk_depthwise.bias.view(G, Dh)
                                                        ).reshape(-1)
        return w.reshape(G * Dh, Dh, k0 + k1 - 1), bias

    def drop_cross_document_taps(self, conv_BTC, qk_pad_BSC, w_CIk, docpos_BT):
        """conv_BTC minus what its taps read across a document start (tap s looks back cs - s tokens; it crosses
        when cs - s > the token's position in its document). Only the first `cs` tokens of each document change, so
        only those are computed."""
        G, Dh, cs = self.H + self.K, self.Dh, self.cs
        b_N, t_N = torch.nonzero(docpos_BT < cs, as_tuple=True)
        taps_NCk = torch.stack([qk_pad_BSC[b_N, t_N + s] for s in range(cs + 1)], dim=-1)
        back_k = torch.arange(cs, -1, -1, device=docpos_BT.device)
        taps_NCk = taps_NCk * (back_k > docpos_BT[b_N, t_N, None])[:, None, :].to(taps_NCk.dtype)
        fix_NGo = torch.einsum("ngik,goik->ngo", taps_NCk.view(-1, G, Dh, cs + 1), w_CIk.view(G, Dh, Dh, cs + 1))
        return conv_BTC.index_put((b_N, t_N), -fix_NGo.reshape(-1, G * Dh), accumulate=True)

    def forward(self, x_BTD, conv_state_BsC=None, vdel_state_BV=None, docpos_BT=None):
        """Returns q [B,T,H,Dh], k [B,T,K,Dh], v [B,T,K,Dh], and the new conv / delayed-value states.

        docpos_BT (packed training only): each token's position inside its document; convolution taps and the
        delayed value that would reach back across a document start are zeroed, as if the document ran alone."""
        B, T, _ = x_BTD.shape
        H, K, Dh, g, cs = self.H, self.K, self.Dh, self.H // self.K, self.cs
        projs = (self.q_proj, self.k_proj, self.v_proj_current, self.v_proj_delayed)
        w_all = _frozen(self, "qkv", [p.weight for p in projs], lambda: torch.cat([p.weight for p in projs]))
        qkv_BTC = F.linear(x_BTD, w_all)                                   # one matmul for q, k, v_cur, v_del
        q_BTC, k_BTC, v_cur_BTV, v_del_BTV = qkv_BTC.split([H * Dh, K * Dh, K * Dh // 2, K * Dh // 2], dim=-1)

        # QK-mean skip terms: each query head averaged with its group's key head; keys = mean of their group.
        q_res = (q_BTC.view(B, T, K, g, Dh) + k_BTC.view(B, T, K, 1, Dh)) * 0.5   # (B, T, K, g, Dh)
        k_res_BTKd = q_res.mean(dim=3)
        q_res_BTHd = q_res.reshape(B, T, H, Dh)

        # Causal convolution over the concatenated (q, k) channels, previous `cs` columns from the state.
        qk_BTC = qkv_BTC[..., : (H + K) * Dh]                              # (q, k) channels, a view
        if conv_state_BsC is None:
            qk_pad = F.pad(qk_BTC, (0, 0, cs, 0))
        else:
            qk_pad = torch.cat([conv_state_BsC.to(qk_BTC.dtype), qk_BTC], dim=1)   # (B, cs+T, C)
        new_conv_state = qk_pad[:, qk_pad.shape[1] - cs:]
        convs = [self.conv_qk_depthwise.weight, self.conv_qk_depthwise.bias, self.conv_qk_grouped.weight,
                 self.conv_qk_grouped.bias]
        w_CIk, bias_C = _frozen(self, "conv", convs, self.composed_conv)
        w_CIk, bias_C = w_CIk.to(qk_pad.dtype), bias_C.to(qk_pad.dtype)
        if T == 1:   # one-token decode: a batched matmul over the taps
            taps_BGIk = qk_pad.view(B, cs + 1, H + K, Dh).permute(0, 2, 3, 1)
            conv_BTC = torch.einsum("bgik,goik->bgo", taps_BGIk, w_CIk.view(H + K, Dh, Dh, cs + 1))
            conv_BTC = conv_BTC.reshape(B, 1, -1) + bias_C
        else:
            conv_BCT = F.conv1d(qk_pad.transpose(1, 2), w_CIk, bias_C, groups=H + K)
            conv_BTC = conv_BCT.transpose(1, 2).contiguous()   # channels last again: SDPA's fast kernels need Dh last
        if docpos_BT is not None:   # packed documents: take back what reached across a document start
            conv_BTC = self.drop_cross_document_taps(conv_BTC, qk_pad, w_CIk, docpos_BT)
        q_BTHd = conv_BTC[..., : H * Dh].reshape(B, T, H, Dh) + q_res_BTHd
        k_BTKd = conv_BTC[..., H * Dh:].reshape(B, T, K, Dh) + k_res_BTKd

        # Values: one half from the current token, the other half from the previous token's delayed projection.
        prev_B1V = (torch.zeros_like(v_del_BTV[:, :1]) if vdel_state_BV is None
                    else vdel_state_BV[:, None].to(v_del_BTV.dtype))
        v_del_shift = torch.cat([prev_B1V, v_del_BTV[:, :-1]], dim=1)
        if docpos_BT is not None:   # a document's first token gets no delayed value from the previous document
            v_del_shift = v_del_shift * (docpos_BT > 0)[..., None].to(v_del_shift.dtype)
        v_BTKd = torch.cat([v_cur_BTV, v_del_shift], dim=-1).view(B, T, K, Dh)
        return q_BTHd, k_BTKd, v_BTKd, new_conv_state, v_del_BTV[:, -1]


class QKNorm(nn.Module):
    """L2-normalise q and k to norm sqrt(Dh) (= RMS-normalise), then scale keys by a learned per-KV-head
    temperature (linear, not exp). Computed in fp32 (TR §IV-D)."""

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        self.temp = nn.Parameter(torch.ones(cfg.num_key_value_heads))

    def forward(self, q_BTHd, k_BTKd):
        # x * sqrt(Dh) / ||x|| == x / rms(x); the reference clamps ||x|| at finfo.eps, we add a tiny eps instead.
        Dh = q_BTHd.shape[-1]
        q = F.rms_norm(q_BTHd.float(), (Dh,), eps=1e-30).to(q_BTHd.dtype)
        k = F.rms_norm(k_BTKd.float(), (Dh,), eps=1e-30) * self.temp.float()[:, None]
        return q, k.to(k_BTKd.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.K, self.Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_type = cfg.layer_types[layer_idx]
        self.qkv_proj = CCAProjection(cfg)
        self.qk_norm = QKNorm(cfg)
        self.o_proj = nn.Linear(self.H * self.Dh, cfg.hidden_size, bias=False)

    def forward(self, x_BTD, rope_cos_sin, mask_B1TS, keep_BT, cache: ZayaCache | None, write_BT=None,
                docpos_BT=None):
        """mask_B1TS None means plain causal attention over these tokens (SDPA's causal kernel)."""
        B, T, _ = x_BTD.shape
        L = self.layer_idx
        if keep_BT is not None:  # zero padded inputs before the convolution (HF-mod's conv mask)
            x_BTD = x_BTD * keep_BT[..., None].to(x_BTD.dtype)
        conv_state = vdel_state = None
        if cache is not None:
            conv_state, vdel_state = cache.conv[L], cache.vdel[L]
        q, k, v, new_conv, new_vdel = self.qkv_proj(x_BTD, conv_state, vdel_state, docpos_BT)
        q, k = self.qk_norm(q, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, Dh)
        q, k = apply_rope(q, rope_cos_sin), apply_rope(k, rope_cos_sin)

        if cache is not None:
            cache.conv[L].copy_(new_conv)
            cache.vdel[L].copy_(new_vdel)
            rows_B1 = torch.arange(B, device=q.device)[:, None]
            cache.k[L][rows_B1, :, write_BT] = k.transpose(1, 2).to(cache.k[L].dtype)   # (B, T, K, Dh)
            cache.v[L][rows_B1, :, write_BT] = v.transpose(1, 2).to(cache.v[L].dtype)
            S = mask_B1TS.shape[-1]
            k, v = cache.k[L][:, :, :S].to(q.dtype), cache.v[L][:, :, :S].to(q.dtype)
        if mask_B1TS is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif T == 1:   # decode: a KV head's g query heads as g query rows, so each cached key is read once per group
            o = F.scaled_dot_product_attention(q.reshape(B, self.K, self.H // self.K, self.Dh), k, v,
                                               attn_mask=mask_B1TS).reshape(B, self.H, 1, self.Dh)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B1TS, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.H * self.Dh))


def _attention_mask(query_idx_BT1, key_idx_S, key_valid_BS, window):
    """Boolean [B, 1, T, S]: causal in cache-index space, padded keys hidden, optional sliding window.

    A query always sees itself, so padded queries stay finite (their outputs are never used)."""
    causal = key_idx_S <= query_idx_BT1
    if key_valid_BS is not None:
        causal = causal & key_valid_BS[:, None, :]
    if window is not None:
        causal = causal & (key_idx_S > query_idx_BT1 - window)
    return (causal | (key_idx_S == query_idx_BT1))[:, None]


class ResidualScaling(nn.Module):
    """merge(o, res) = (o + b_o) * s_o + (res + b_r) * s_r, in fp32 (TR eq. 6)."""

    def __init__(self, dim: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(dim))
        self.hidden_states_bias = nn.Parameter(torch.zeros(dim))
        self.residual_scale = nn.Parameter(torch.ones(dim))
        self.residual_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, out_BTD, res_BTD):
        # (o + b_o) * s_o + (r + b_r) * s_r  ==  o * s_o + r * s_r + (b_o * s_o + b_r * s_r): two fused ops
        s_o, s_r = self.hidden_states_scale.float(), self.residual_scale.float()
        const = self.hidden_states_bias.float() * s_o + self.residual_bias.float() * s_r
        return torch.addcmul(torch.addcmul(const, res_BTD, s_r), out_BTD.float(), s_o)


class RouterMLP(nn.Module):
    def __init__(self, R: int, n_classes: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(R, eps)
        self.fc1 = nn.Linear(R, R)
        self.fc2 = nn.Linear(R, R)
        self.out_proj = nn.Linear(R, n_classes, bias=False)

    def forward(self, r_NR):
        h = F.gelu(self.fc1(self.norm(r_NR)))
        return self.out_proj(F.gelu(self.fc2(h)))


ZERO_OR_SKIP = -2   # a replayed route that is expert 0 or the skip class (see the module NOTE)


class Router(nn.Module):
    """TR eqs. 1-5: down-projection, EDA, MLP over E experts + skip, fp32 softmax, top-1 with balancing biases."""

    def __init__(self, cfg: ZayaConfig, layer_idx: int):
        super().__init__()
        self.E = cfg.num_experts
        self.down_proj = nn.Linear(cfg.hidden_size, cfg.router_hidden_size, bias=True)
        if layer_idx > 0:  # no EDA state to mix into the first block
            self.router_states_scale = nn.Parameter(torch.ones(cfg.router_hidden_size))
        self.router_mlp = RouterMLP(cfg.router_hidden_size, self.E + 1, cfg.rms_norm_eps)
        biases = torch.zeros(self.E + 1)
        biases[-1] = -1.0
        self.register_buffer("balancing_biases", biases)
        self.load_counts = None      # [E+1] tokens per class since the last balancing update (training)
        self.bias_optim_state = None  # (exp_avg, exp_avg_sq, step) of the internal AdamW

    def forward(self, x_ND, r_prev_NR, keep_N, replay_N=None):
        """Returns (expert id or -1 per token, combine weight, router latent for the next block)."""
        r_NR = self.down_proj(x_ND)
        if r_prev_NR is not None and hasattr(self, "router_states_scale"):
            r_NR = r_NR + r_prev_NR * self.router_states_scale           # EDA (eq. 2)
        probs_NE1 = torch.softmax(self.router_mlp(r_NR).float(), dim=-1)  # fp32 softmax (eq. 3)
        biased_NE1 = probs_NE1.detach() + self.balancing_biases
        if replay_N is None:
            choice_N = torch.argmax(biased_NE1, dim=-1)   # eq. 4
        else:
            zero_or_skip_N = torch.where(biased_NE1[:, 0] >= biased_NE1[:, self.E], 0, self.E)
            choice_N = torch.where(replay_N < 0, self.E, replay_N)
            choice_N = torch.where(replay_N == ZERO_OR_SKIP, zero_or_skip_N, choice_N)
        if keep_N is not None:
            choice_N = torch.where(keep_N, choice_N, self.E + 1)           # padding: counted nowhere
        if self.training:
            counts = torch.bincount(choice_N, minlength=self.E + 2)[: self.E + 1].float()
            self.load_counts = counts if self.load_counts is None else self.load_counts + counts
        route_N = torch.where(choice_N >= self.E, -1, choice_N)
        weight_N = probs_NE1.gather(1, route_N.clamp_min(0)[:, None])[:, 0] * (route_N >= 0)
        return route_N, weight_N, r_NR


@functools.cache   # asked per layer and forward: the device's capability is read once
def _has_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM: CPU kernel since torch 2.10 (not fp16), CUDA on sm80+ for bf16 (its documented input
    type). Elsewhere we loop over experts."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and dtype != torch.float16


def _grouped_swiglu(xs_MD, gate_up_EID, down_EDI, offs_E):
    """SwiGLU of rows sorted by expert, expert e on rows [offs_E[e-1], offs_E[e]) (rows past offs_E[-1] are
    ignored), as two grouped GEMMs."""
    gate, up = F.grouped_mm(xs_MD, gate_up_EID.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
    return F.grouped_mm((F.silu(gate) * up).contiguous(), down_EDI.transpose(1, 2), offs=offs_E)


def _experts_forward(x_ND, route_N, weight_N, gate_up_EID, down_EDI, use_grouped_mm: bool):
    """SwiGLU experts with grouped dispatch: sort tokens by expert, run each expert once on its contiguous slice
    (one grouped GEMM where torch has one, else a loop over the experts that received tokens).
    On CUDA without gradients the sync-free variant runs instead when it costs no extra expert compute (grouped
    GEMM), and always while a CUDA graph is being captured: the host read of the token counts below stalls the
    launch queue once per layer."""
    if x_ND.is_cuda and not torch.is_grad_enabled() and (
            torch.cuda.is_current_stream_capturing() or (use_grouped_mm and _has_grouped_mm(x_ND.device, x_ND.dtype))):
        return _experts_forward_static(x_ND, route_N, weight_N, gate_up_EID, down_EDI, use_grouped_mm)
    E = gate_up_EID.shape[0]
    order_N = torch.argsort(route_N, stable=True)
    counts_E1 = torch.bincount(route_N + 1, minlength=E + 1)          # [skip/pad, e0, e1, ...]
    n_skip = int(counts_E1[0])
    token_idx = order_N[n_skip:]                                        # skip and padding are never computed
    y_ND = torch.zeros_like(x_ND)
    if token_idx.numel() == 0:
        return y_ND
    xs_MD = x_ND[token_idx]
    if use_grouped_mm and _has_grouped_mm(x_ND.device, x_ND.dtype):
        out_MD = _grouped_swiglu(xs_MD, gate_up_EID, down_EDI, counts_E1[1:].cumsum(0).to(torch.int32))
    else:
        # NOTE: split/unbind rather than slicing/indexing: their backward is one cat/stack, whereas each
        # slice or select would materialise a full-size zero gradient per expert.
        w_gate_up, w_down = gate_up_EID.unbind(0), down_EDI.unbind(0)
        outs = []
        for e, xs_nD in enumerate(xs_MD.split(counts_E1[1:].tolist())):
            if xs_nD.shape[0] == 0:
                continue
            gate, up = F.linear(xs_nD, w_gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w_down[e]))
        out_MD = torch.cat(outs)
    out_MD = out_MD * weight_N[token_idx, None].to(x_ND.dtype)
    return y_ND.index_copy(0, token_idx, out_MD)


def _experts_forward_static(x_ND, route_N, weight_N, gate_up_EID, down_EDI, use_grouped_mm: bool):
    """The same function with no host read of the token counts, so a CUDA graph can capture it and the launch
    queue never stalls (inference only, CUDA; see `_experts_forward` and engine.Engine(cuda_graphs=...)). Skip and
    padding rows sort last and lie beyond the grouped GEMM's last offset, which it ignores, so they still cost no
    expert compute; their (unwritten) rows are masked to zero. Without a grouped GEMM every expert runs on all N
    rows, masked: N is the decode batch there."""
    E, N = gate_up_EID.shape[0], x_ND.shape[0]
    key_N = torch.where(route_N < 0, E, route_N)                        # skip/pad -> E (sorts last)
    # A counting sort by elementwise ops only (argsort, bincount and one_hot may read sizes on the host):
    # token n goes to row start[key] + (tokens before n with the same key).
    hit_NE1 = key_N[:, None] == torch.arange(E + 1, device=x_ND.device)
    counts_E1 = hit_NE1.sum(0)
    rank_N = (hit_NE1.cumsum(0) * hit_NE1).sum(1) - 1 + (counts_E1.cumsum(0) - counts_E1)[key_N]
    order_N = torch.empty_like(rank_N).scatter_(0, rank_N, torch.arange(N, device=x_ND.device))
    routed_N1 = (key_N[order_N] < E)[:, None]
    xs_ND = x_ND[order_N]
    w_N1 = weight_N[order_N, None].to(x_ND.dtype)
    if use_grouped_mm and _has_grouped_mm(x_ND.device, x_ND.dtype):
        out_ND = _grouped_swiglu(xs_ND, gate_up_EID, down_EDI, counts_E1[:E].cumsum(0).to(torch.int32))
    else:
        key_sorted_N1 = key_N[order_N, None]
        out_ND = torch.zeros_like(xs_ND)
        for e in range(E):
            gate, up = F.linear(xs_ND, gate_up_EID[e]).chunk(2, dim=-1)
            out_ND = torch.where(key_sorted_N1 == e, F.linear(F.silu(gate) * up, down_EDI[e]), out_ND)
    out_ND = torch.where(routed_N1, out_ND * w_N1, 0.0)
    return torch.empty_like(x_ND).index_copy_(0, order_N, out_ND)


@torch.library.custom_op("openzaya::experts", mutates_args=())
def _experts_op(x_ND: torch.Tensor, route_N: torch.Tensor, weight_N: torch.Tensor, gate_up_EID: torch.Tensor,
                down_EDI: torch.Tensor, use_grouped_mm: bool) -> torch.Tensor:
    """The experts as one opaque op for torch.compile (inference only): its token counts are data-dependent and
    CPU grouped_mm has no fp32 fake kernel, so the compiler sees only 'y has the shape of x'."""
    return _experts_forward(x_ND, route_N, weight_N, gate_up_EID, down_EDI, use_grouped_mm)


@_experts_op.register_fake
def _(x_ND, route_N, weight_N, gate_up_EID, down_EDI, use_grouped_mm):
    return torch.empty_like(x_ND)


class Experts(nn.Module):
    """SwiGLU experts `gate_up_proj [E, 2I, D]`, `down_proj [E, D, I]`, grouped dispatch (`_experts_forward`)."""

    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.use_grouped_mm = True   # set False to force the per-expert loop (the tested fallback)

    def forward(self, x_ND, route_N, weight_N):
        args = (x_ND, route_N, weight_N, self.gate_up_proj, self.down_proj, self.use_grouped_mm)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            return _experts_op(*args)          # compiled decode (Engine(compile=True)): opaque to the compiler
        return _experts_forward(*args)


class MoE(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer_idx: int):
        super().__init__()
        self.gate = Router(cfg, layer_idx)
        self.experts = Experts(cfg)

    def forward(self, x_BTD, r_prev_NR, keep_BT, replay_BT=None):
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        keep_N = None if keep_BT is None else keep_BT.reshape(-1)
        replay_N = None if replay_BT is None else replay_BT.reshape(-1)
        route_N, weight_N, r_NR = self.gate(x_ND, r_prev_NR, keep_N, replay_N)
        y_ND = self.experts(x_ND, route_N, weight_N)
        return y_ND.view(B, T, D), r_NR, route_N.view(B, T)


class Block(nn.Module):
    def __init__(self, cfg: ZayaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_residual_scale = ResidualScaling(cfg.hidden_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer_idx)
        self.post_mlp_residual_scale = ResidualScaling(cfg.hidden_size)

    def forward(self, h_BTD, r_prev_NR, rope, mask_B1TS, keep_BT, cache, write_BT, replay_BT=None, docpos_BT=None):
        a = self.self_attn(self.input_layernorm(h_BTD), rope, mask_B1TS, keep_BT, cache, write_BT, docpos_BT)
        h_BTD = self.post_attention_residual_scale(a, h_BTD)
        m, r_NR, route_BT = self.mlp(self.post_attention_layernorm(h_BTD), r_prev_NR, keep_BT, replay_BT)
        h_BTD = self.post_mlp_residual_scale(m, h_BTD)
        return h_BTD, r_NR, route_BT


class ZayaModel(nn.Module):
    def __init__(self, cfg: ZayaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _LMHeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T)[target] per row, a chunk of rows at a time: the [N, V] logits never exist at once
    (at the released vocab of 262K, 4096 tokens of fp32 logits are 4.3 GB, before log_softmax's copies). The backward
    recomputes each chunk's logits: d logp / d logits = onehot(target) - softmax. Rows with target < 0 get logp 0
    and no gradient. Everything in fp32 (h and W arrive as fp32)."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, target_N, chunk: int):
        logp_N = torch.zeros(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        lse_N = torch.zeros_like(logp_N)
        valid_N = target_N >= 0
        tgt_N = target_N.clamp_min(0)
        for i in range(0, h_ND.shape[0], chunk):
            logits_nV = F.linear(h_ND[i:i + chunk], w_VD)
            lse_n = torch.logsumexp(logits_nV, dim=-1)
            lse_N[i:i + chunk] = lse_n
            logp_N[i:i + chunk] = logits_nV.gather(1, tgt_N[i:i + chunk, None])[:, 0] - lse_n
        ctx.save_for_backward(h_ND, w_VD, tgt_N, valid_N, lse_N)
        ctx.chunk = chunk
        return logp_N * valid_N

    @staticmethod
    def backward(ctx, g_N):
        h_ND, w_VD, tgt_N, valid_N, lse_N = ctx.saved_tensors
        g_N = g_N * valid_N
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_VD) if ctx.needs_input_grad[1] else None
        for i in range(0, h_ND.shape[0], ctx.chunk):
            h_nD = h_ND[i:i + ctx.chunk]
            probs_nV = torch.exp(F.linear(h_nD, w_VD) - lse_N[i:i + ctx.chunk, None])
            g_n1 = g_N[i:i + ctx.chunk, None]
            dlogits_nV = (probs_nV * -g_n1).scatter_add_(1, tgt_N[i:i + ctx.chunk, None], g_n1)
            if grad_h is not None:
                grad_h[i:i + ctx.chunk] = dlogits_nV @ w_VD
            if grad_w is not None:
                grad_w += dlogits_nV.T @ h_nD
        return grad_h, grad_w, None, None


def lm_head_logprobs(h_ND, w_VD, target_N, max_chunk_logits: int = 2**26):
    """Per-row log-probability of `target_N` under softmax(h W^T), fp32 [N]; 0 where target < 0 (ignored).

    The LM head runs in fp32 whatever the weights' dtype and autocast say (LM head and CE belong to the TR's fp32
    op set, §IV-D).
    When all N x V logits fit in `max_chunk_logits` (256 MB of fp32 by default) they are computed at once with a
    plain autograd graph; above that, chunks of rows with the recomputing backward (about one extra LM-head matmul,
    memory bounded by the chunk: 1.8 GB instead of 13 GB peak for 4096 tokens at vocab 262K, measured)."""
    N, V = h_ND.shape[0], w_VD.shape[0]
    with torch.autocast(h_ND.device.type, enabled=False):
        h, w = h_ND.float(), w_VD.float()
        if N * V <= max_chunk_logits:
            logp_N = torch.log_softmax(F.linear(h, w), dim=-1).gather(1, target_N.clamp_min(0)[:, None])[:, 0]
            return logp_N * (target_N >= 0)
        return _LMHeadLogprobs.apply(h, w, target_N, max(1, max_chunk_logits // V))


# -----------------------------------------------------------------------------
# The causal LM


class ZayaForCausalLM(nn.Module):
    def __init__(self, config: ZayaConfig):
        super().__init__()
        self.config = config
        self.model = ZayaModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.balance_lr = 1e-3       # internal AdamW of the bias balancing (eq. 5)
        self.balance_enabled = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, initializer_range) matrices, zero biases, unit scales. Two choices of ours (the reference
        starts the key temperature at 0, i.e. uniform attention): key temperature 1, and both CCA convolutions
        start as the identity on the newest column (plus noise), so training starts from plain (q, k)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(("scale", "norm.weight", "layernorm.weight", "temp")):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)
        for layer in self.model.layers:
            proj = layer.self_attn.qkv_proj
            proj.conv_qk_depthwise.weight[..., -1] += 1.0                  # [C, 1, k]
            g = proj.conv_qk_grouped.weight                                 # [C, Dh, k], Dh channels per group
            g[..., -1] += torch.eye(g.shape[1], dtype=g.dtype).repeat(g.shape[0] // g.shape[1], 1)

    @property
    def device(self):
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype

    def output_embeddings(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, cache: ZayaCache | None = None, *,
                replay_routes=None, return_routes: bool = False, return_hidden: bool = False,
                logits_to_keep: int = 0, segment_ids_BT=None):
        """Logits [B, T, V] (fp32) for input_ids [B, T].

        attention_mask [B, T] marks real tokens (1) vs left padding (0) among *these* tokens; a cache
        remembers which earlier positions were real. RoPE positions count real tokens only, so a left-padded
        row gives the same logits as the row alone. With `cache`, the tokens are appended to each row at its
        own write position (prefill, one-token decode or multi-token continuation).
        replay_routes [L, B, T] (expert id, -1 = none, -2 = expert 0 or skip) forces the routing (router replay); with
        `return_routes=True` the chosen routes [L, B, T] are returned as well: (logits, routes).
        `return_hidden=True` returns the final normed hidden states instead of logits (for chunked losses).
        segment_ids_BT [B, T] (packed training, no cache): document id of each token; attention is block-diagonal
        causal, RoPE positions restart at each document, and the CCA convolution and delayed value never cross a
        document boundary, so each document gets the logits it would get alone (tested in tests/test_data.py).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        keep_BT = None
        if attention_mask is not None:
            keep_BT = attention_mask.to(torch.bool)
            if bool(keep_BT.all()):
                keep_BT = None
        arange_T = torch.arange(T, device=dev)
        write_BT = None
        if cache is not None:
            if torch.compiler.is_compiling() or (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                S = cache.max_len   # static shapes: attend over the whole cache, unwritten keys are masked
            else:
                S = int(cache.write_B.max()) + T
                if S > cache.max_len:
                    raise ValueError(f"cache overflow: {S - T} + {T} tokens > max_len {cache.max_len}")
            start_B1 = cache.pos_B[:, None]
            write_BT = cache.write_B[:, None] + arange_T                          # cache index of each new token
            rows_B1 = torch.arange(B, device=dev)[:, None]
            new_valid_BT = torch.ones_like(write_BT, dtype=torch.bool) if keep_BT is None else keep_BT
            cache.valid_BS[rows_B1, write_BT] = new_valid_BT      # a tensor: a CUDA graph can capture the write
        else:
            start_B1 = torch.zeros(B, 1, dtype=torch.long, device=dev)
        docpos_BT = None
        if segment_ids_BT is not None:
            if cache is not None:
                raise ValueError("segment_ids_BT is for packed training; it cannot be combined with a cache")
            new_doc_BT = torch.ones(B, T, dtype=torch.bool, device=dev)
            new_doc_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
            doc_start_BT = torch.cummax(torch.where(new_doc_BT, arange_T, 0), dim=1).values
            docpos_BT = positions_BT = arange_T - doc_start_BT
        elif keep_BT is None:
            positions_BT = start_B1 + arange_T
        else:
            positions_BT = start_B1 + (keep_BT.long().cumsum(1) - 1).clamp_min(0)

        # Per layer type, built once per forward: RoPE tables and the attention mask (None = plain causal).
        cfg, dtype = self.config, self.dtype
        rope, masks = {}, {}
        for lt in set(cfg.layer_types):
            rope[lt] = rope_cos_sin(positions_BT, cfg.head_dim, cfg.rope_parameters[lt], dtype)
            window = cfg.sliding_window if lt == "hybrid_sliding" else None
            if segment_ids_BT is not None:   # block-diagonal causal
                same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
                masks[lt] = _attention_mask(arange_T[None, :, None].expand(B, T, 1), arange_T, keep_BT,
                                            window) & same_BTT[:, None]
            elif cache is not None:
                masks[lt] = _attention_mask(write_BT[..., None], torch.arange(S, device=dev),
                                            cache.valid_BS[:, :S], window)
            elif keep_BT is not None or (window is not None and window < T):
                masks[lt] = _attention_mask(arange_T[None, :, None].expand(B, T, 1), arange_T, keep_BT, window)
            else:
                masks[lt] = None

        m = self.model
        h = m.embed_tokens(input_ids).float()
        h_BTD = (h + m.input_hidden_states_bias.float()) * m.input_hidden_states_scale.float()  # fp32 stream
        r_NR, routes = None, []
        for i, layer in enumerate(m.layers):
            lt = cfg.layer_types[i]
            replay_BT = None if replay_routes is None else replay_routes[i]
            h_BTD, r_NR, route_BT = layer(h_BTD, r_NR, rope[lt], masks[lt], keep_BT, cache, write_BT, replay_BT,
                                          docpos_BT)
            routes.append(route_BT)
        if cache is not None:
            cache.write_B += T
            cache.pos_B += T if keep_BT is None else keep_BT.sum(1)

        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        x = m.norm(h_BTD.to(m.norm.weight.dtype))
        out = x if return_hidden else F.linear(x, self.output_embeddings()).float()
        if return_routes:
            return out, torch.stack(routes)
        return out

    def token_logprobs(self, input_ids, targets_BT, **forward_kwargs):
        """log p(targets_BT[b, t] | input_ids[b, :t+1]) [B, T'] fp32 for the first T' <= T positions, through the
        chunked LM head (no [B, T, V] logits); targets < 0 (e.g. -100) are ignored: logprob 0, no gradient.
        `forward_kwargs` go to `forward` (attention_mask, replay_routes, segment_ids_BT, ...)."""
        h_BTD = self(input_ids, return_hidden=True, **forward_kwargs)
        B, Tt = targets_BT.shape
        h_ND = h_BTD[:, :Tt].reshape(B * Tt, -1)
        return lm_head_logprobs(h_ND, self.output_embeddings(), targets_BT.reshape(-1)).view(B, Tt)

    @torch.no_grad()
    def relayout_experts_for_decode(self) -> "ZayaForCausalLM":
        """Keep every expert matrix transposed in memory. Shapes ([E, 2I, D], [E, D, I]), names, values and the
        state dict stay as they are; only the strides change, so the grouped GEMM's `x @ W^T` reads W^T row by row.
        With a few tokens per expert (batched decode) MKL's fp32 kernels run that layout much faster: bench config,
        16 tokens over 16 experts, 31 -> 21 ms per 8-layer step, engine at batch 16 252 -> 311 tok/s (dev/LOG.md,
        session 6); at training-sized batches it is 5-10% slower, so only code that owns an inference-only model
        calls this (`backends.load_local`, i.e. LocalBackend and `openzaya serve`; RL rollout workers;
        bench/engine.py). CPU only: on other devices nothing changes (not measured there). Calling it twice changes
        nothing. Returns self."""
        for mod in self.modules():
            if isinstance(mod, Experts):
                for p in (mod.gate_up_proj, mod.down_proj):
                    if p.device.type == "cpu":
                        p.data = p.data.transpose(1, 2).contiguous().transpose(1, 2)
        return self

    # --- training-only: bias balancing (TR eq. 5) and load statistics ------------------------------
    def routers(self) -> list[Router]:
        return [layer.mlp.gate for layer in self.model.layers]

    @torch.no_grad()
    def update_balancing_biases(self, betas=(0.9, 0.999), eps=1e-8):
        """Move each router's balancing biases by eq. 5 and reset the load counts. Call after optimizer.step().

        Gradient of expert e's bias: p_e - 1/E, with p_e the fraction of routed (non-skip, non-padding) tokens that
        chose e since the last call (all-reduced over ranks when torch.distributed is initialised), fed to a small
        internal AdamW (the report's "PID optimizer"). The skip bias is not balanced: it keeps its value.
        NOTE: the report leaves open whether skip has a target share; we give it none.
        """
        counts = [r.load_counts for r in self.routers()]
        if not self.balance_enabled or any(c is None for c in counts):
            for r in self.routers():
                r.load_counts = None
            return
        counts_LE1 = torch.stack(counts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_LE1)
        b1, b2 = betas
        for r, c in zip(self.routers(), counts_LE1):
            E = r.E
            p_E = c[:E] / c[:E].sum().clamp_min(1.0)
            grad = p_E - 1.0 / E
            if r.bias_optim_state is None:
                r.bias_optim_state = [torch.zeros_like(grad), torch.zeros_like(grad), 0]
            m_, v_, step = r.bias_optim_state
            step += 1
            m_.mul_(b1).add_(grad, alpha=1 - b1)
            v_.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (m_ / (1 - b1 ** step)) / ((v_ / (1 - b2 ** step)).sqrt() + eps)
            r.balancing_biases[:E] -= self.balance_lr * update.to(r.balancing_biases.device)
            r.bias_optim_state[2] = step
            r.load_counts = None

    @torch.no_grad()
    def expert_load_stats(self) -> list[dict]:
        """Per layer, `expert_load` of the counts accumulated since the last balancing update."""
        return [expert_load(r.load_counts) for r in self.routers()]


def expert_load(counts_E1: torch.Tensor | None) -> dict:
    """One layer's load from its token counts per class [E+1] (the E experts, then skip): max/mean expert load over
    the E experts, and the fraction of tokens that took the skip class; NaN when nothing was counted."""
    if counts_E1 is None or counts_E1.sum() == 0:
        return {"max_mean": float("nan"), "skip": float("nan")}
    experts_E = counts_E1[:-1].float()
    return {"max_mean": float(experts_E.max() / experts_E.mean().clamp_min(1e-9)),
            "skip": float(counts_E1[-1] / counts_E1.sum())}


def count_params(cfg: ZayaConfig) -> dict:
    """Total, embedding and active-per-token parameter counts from the config alone (shapes of the spec §9)."""
    D, H, K, Dh, R = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.router_hidden_size
    E, I, C = cfg.num_experts, cfg.moe_intermediate_size, cfg.conv_channels
    attn = D * H * Dh + D * K * Dh + D * K * Dh + C * cfg.cca_time0 + C + C * Dh * cfg.cca_time1 + C + K + H * Dh * D
    router = D * R + R + R + 2 * (R * R + R) + R * (E + 1)   # + EDA scale (all but block 0) below
    one_expert = 2 * I * D + D * I
    small = 2 * D + 8 * D                                      # two norms + two residual scalings
    L = cfg.num_hidden_layers
    non_embed = L * (attn + router + E * one_expert + small) + (L - 1) * R + 2 * D + D
    embed = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2)
    active = L * (attn + router + one_expert + small) + (L - 1) * R + 2 * D + D
    return {"total": non_embed + embed, "non_embedding": non_embed, "embedding": embed, "active_per_token": active}


def flops_per_token(cfg: ZayaConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (the MFU numerator, as nanochat/PaLM count them): 2 per active parameter per token
    forward, with N_active = count_params' active_per_token (one expert per token) + the LM head (V x D), plus the
    attention matmuls (QK^T and PV: 4 * H * Dh per key attended, a causal window of seq_len attends (seq_len + 1) / 2
    keys on average, per layer); training = 3x forward (backward = 2x forward). Skip-routed tokens and the CCA
    convolution's composition are not discounted: an upper estimate of the useful work of a step."""
    n_active = count_params(cfg)["active_per_token"] + cfg.vocab_size * cfg.hidden_size
    attn = 4 * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1) / 2 * cfg.num_hidden_layers
    return (3 if training else 1) * (2 * n_active + attn)
