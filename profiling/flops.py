"""FLOP and parameter counts of a configuration, per matmul, stated so a reader can check them by hand.

Counted: every matrix product of a training step, as 2 FLOPs per multiply-add. Forward per token and layer
(``d`` = dim, ``h`` = heads x head_dim = d, ``h_kv`` = kv heads x head_dim, ``f`` = FFN hidden, ``S`` = seq,
``V`` = vocab)::

    QKV projections   2 * d * (h + 2 h_kv)
    output projection 2 * h * d
    attention         2 * h * (S + 1)          exact causal count: query i scores i+1 keys (QK^T) and sums
                                               i+1 values (PV); averaged over i = 1..S that is (S+1)/2 keys,
                                               2 * 2 * h FLOPs each
    SwiGLU FFN        2 * 3 * d * f            (W1, W3, W2)
    LM head (once)    2 * d * V

A training step is 3x the forward (backward = 2x forward: the input and the weight gradient of every product;
for attention dQ, dK, dV and dP), over ``batch * seq`` tokens. Not counted: norms, rotary embeddings, softmax,
the SwiGLU gate, the loss, the embedding lookup, FlashAttention's recomputation in backward, routing/plan work.

Equivalently ``6 * N * tokens + 6 * n_layers * h * (S + 1) * tokens`` where ``N`` is the number of weights a token
multiplies (non-embedding, LM head included). The common ``12 * n_layers * d * S`` attention term counts the masked
half of a causal attention too; it would give a larger number for the same run.

MoT: every token uses its own modality's copy of each weight, so FLOPs per token equal the dense model's, while
the parameter count grows: non-embedding weights x ``num_modalities``. The reference-style MoT does the same
useful FLOPs (its extra work, mask indexing and copies, is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profiling.registry import ModelConfig

FORMULA = (
    "training FLOPs/step = 3 x forward; forward/token = n_layers x [2·d·(h + 2·h_kv) (QKV) + 2·h·d (out) "
    "+ 2·h·(S+1) (causal attention, exact lower triangle) + 6·d·f (SwiGLU)] + 2·d·V (LM head); "
    "i.e. 6·N·tokens + 6·n_layers·h·(S+1)·tokens, N = weights a token multiplies (non-embedding, head included). "
    "Norms, rotary, softmax, SwiGLU gate, loss and FlashAttention's backward recomputation are not counted."
)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token by component (whole model: layers summed, LM head once)."""

    components: dict[str, int]

    @property
    def forward_per_token(self) -> int:
        return sum(self.components.values())

    @property
    def train_per_token(self) -> int:
        """Forward + backward (3 x forward)."""
        return 3 * self.forward_per_token

    def train_per_step(self, batch: int, seq: int) -> int:
        return self.train_per_token * batch * seq


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter; active: those one token uses (one modality's); embedding: the input table."""

    total: int
    active: int
    embedding: int


def _heads(cfg: ModelConfig) -> tuple[int, int]:
    head_dim = cfg.dim // cfg.n_heads
    n_kv = cfg.options.get("n_kv_heads", cfg.n_heads)
    return cfg.n_heads * head_dim, n_kv * head_dim


def transformer_flops(cfg: ModelConfig) -> FlopCount:
    """The counts of the module docstring for the dense / MoT / reference-MoT transformer."""
    d, L, f, S, V = cfg.dim, cfg.n_layers, cfg.hidden, cfg.seq, cfg.vocab
    h, h_kv = _heads(cfg)
    return FlopCount(
        {
            "qkv": L * 2 * d * (h + 2 * h_kv),
            "out_proj": L * 2 * h * d,
            "attention": L * 2 * h * (S + 1),
            "ffn": L * 2 * 3 * d * f,
            "lm_head": 2 * d * V,
        }
    )


def transformer_params(cfg: ModelConfig) -> ParamCount:
    """Embedding ``V·d`` + per layer and modality ``d·(h + 2 h_kv) + h·d + 3·d·f + 2·d`` (two RMSNorm weights)
    + final norm ``M·d`` + LM head ``V·d`` (untied)."""
    d, L, f, V, M = cfg.dim, cfg.n_layers, cfg.hidden, cfg.vocab, cfg.num_modalities
    h, h_kv = _heads(cfg)
    per_layer = d * (h + 2 * h_kv) + h * d + 3 * d * f + 2 * d
    embedding = V * d
    shared = embedding + V * d
    return ParamCount(
        total=shared + M * (L * per_layer + d), active=shared + L * per_layer + d, embedding=embedding
    )


def flop_count(cfg: ModelConfig) -> FlopCount:
    """The FLOP count of ``cfg`` by its family's formula (see :func:`profiling.registry.register_family`)."""
    from profiling.registry import family

    return family(cfg.family).flops(cfg)


def param_count(cfg: ModelConfig) -> ParamCount:
    from profiling.registry import family

    return family(cfg.family).params(cfg)


def moma_flops(cfg: ModelConfig) -> FlopCount:
    """MoMa / expert-choice MoE: the dense counts with the FFN scaled by the capacity factor ``c`` (``E_m * C_m``
    expert rows per group of ``b_m`` tokens: ``c`` experts' FFN per token on average; the rounding of ``C_m``
    and the empty rows of the buffer bound are not counted) plus every router, ``2 * d * E_total`` per token
    (each router scores every token). With ``options["mod_capacity"]`` (MoD every ``mod_every``-th layer): those
    layers' per-token work scaled by ``c_d`` and their attention by ``c_d^2`` (a chosen token attends to the chosen
    keys of its sequence), plus the MoD router ``2 * d`` per token and MoD layer."""
    base = transformer_flops(cfg).components
    c = cfg.options.get("capacity_factor", 1.0)
    experts = sum(cfg.options["experts"])
    counts = {**base, "ffn": c * base["ffn"], "router": cfg.n_layers * 2 * cfg.dim * experts}
    c_d = cfg.options.get("mod_capacity")
    if c_d is not None:
        # MoD layers: a fraction c_d of the tokens runs the layer, attending to a fraction c_d of the keys.
        L = cfg.n_layers
        L_mod = len(range(0, L, cfg.options.get("mod_every", 2)))
        rows = (L - L_mod + c_d * L_mod) / L
        pairs = (L - L_mod + c_d * c_d * L_mod) / L
        counts = {k: v * (pairs if k == "attention" else rows) if k != "lm_head" else v for k, v in counts.items()}
        counts["mod_router"] = L_mod * 2 * cfg.dim
    return FlopCount({k: round(v) for k, v in counts.items()})


def moma_params(cfg: ModelConfig) -> ParamCount:
    """The dense model's (one modality) with ``E_total`` SwiGLU experts per layer instead of one, plus the routers
    ``d * E_total`` per layer; active: one expert's FFN per token (capacity factor 1) and every router."""
    dense = transformer_params(cfg.override(num_modalities=1))
    experts = sum(cfg.options["experts"])
    ffn = 3 * cfg.dim * cfg.hidden
    routers = cfg.n_layers * cfg.dim * experts
    if cfg.options.get("mod_capacity") is not None:  # one MoD router (d x 1) per MoD layer
        routers += len(range(0, cfg.n_layers, cfg.options.get("mod_every", 2))) * cfg.dim
    return ParamCount(total=dense.total + cfg.n_layers * (experts - 1) * ffn + routers,
                      active=dense.active + routers, embedding=dense.embedding)


def token_choice_flops(cfg: ModelConfig) -> FlopCount:
    """Token choice: the dense counts with ``cfg.hidden`` the expert width and the FFN done ``top_k`` times per
    token (dropless), plus the router ``2 * d * E`` per token and layer."""
    base = transformer_flops(cfg).components
    k, experts = cfg.options["top_k"], cfg.options["experts"]
    return FlopCount({**base, "ffn": k * base["ffn"], "router": cfg.n_layers * 2 * cfg.dim * experts})


def token_choice_params(cfg: ModelConfig) -> ParamCount:
    """The dense model's (FFN width ``cfg.hidden``) with ``E`` experts per layer instead of one and the routers
    ``d * E`` per layer; active: ``top_k`` experts' FFNs per token and every router."""
    dense = transformer_params(cfg.override(num_modalities=1))
    k, experts = cfg.options["top_k"], cfg.options["experts"]
    ffn = 3 * cfg.dim * cfg.hidden
    routers = cfg.n_layers * cfg.dim * experts
    return ParamCount(total=dense.total + cfg.n_layers * (experts - 1) * ffn + routers,
                      active=dense.active + cfg.n_layers * (k - 1) * ffn + routers, embedding=dense.embedding)


def avgk_flops(cfg: ModelConfig) -> FlopCount:
    """Avg-K: the dense counts with ``cfg.hidden`` = the active cells (``top_k * block_size``, SwiGLU cells), plus the
    selection ``2 * d * n_blocks`` per token and layer (the mean keys' own cost, ``d * cells`` per layer and step, is
    not counted)."""
    base = transformer_flops(cfg).components
    n_blocks = cfg.options["cells"] // cfg.options["block_size"]
    return FlopCount({**base, "avgk_select": cfg.n_layers * 2 * cfg.dim * n_blocks})


def avgk_params(cfg: ModelConfig) -> ParamCount:
    """The dense model's with every FFN ``3 * d * cells`` instead of ``3 * d * hidden``; active: ``hidden`` cells."""
    dense = transformer_params(cfg.override(num_modalities=1))
    extra = cfg.n_layers * 3 * cfg.dim * (cfg.options["cells"] - cfg.hidden)
    return ParamCount(total=dense.total + extra, active=dense.active, embedding=dense.embedding)
