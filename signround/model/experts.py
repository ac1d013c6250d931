"""Mixture-of-experts: replace transformers' fused 3D expert tensors by one ``nn.Linear`` per expert.

transformers 5 keeps a MoE layer's experts as fused 3D parameters in one module (``mlp.experts``).
signround quantizes ``nn.Linear`` layers, and the serving engines' quantized MoE loaders (vLLM, like
auto-round's writer) read per-expert names, so :func:`unfuse_experts` swaps each known fused module for an
:class:`UnfusedExperts` list whose expert ``e`` holds ``gate_proj``, ``up_proj`` and ``down_proj``; the
layers are then named ``model.layers.{i}.mlp.experts.{e}.gate_proj`` (etc.). The routers (``mlp.gate``,
``mlp.router``) are separate modules and stay as they are.

Layouts (``E`` experts, hidden width ``H``, expert width ``I``; a per-expert ``nn.Linear`` weight is
``[out, in]``: gate/up ``[I, H]``, down ``[H, I]``):

- :attr:`ExpertLayout.OUTPUT_MAJOR` (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3): ``gate_up_proj [E, 2I, H]``
  is output-major like ``nn.Linear.weight``, gate rows ``[:I]`` then up rows ``[I:]`` (the forward's
  ``chunk(2, dim=-1)``; Mixtral's checkpoint ``w1`` is gate, ``w3`` up); ``down_proj [E, H, I]``; no bias;
  expert MLP ``down(act(gate(x)) * up(x))``.
- :attr:`ExpertLayout.GPT_OSS`: ``gate_up_proj [E, H, 2I]`` is input-major (the forward computes
  ``x @ W``) with gate and up *interleaved* along the last axis (gate columns ``0::2``, up ``1::2``);
  ``gate_up_proj_bias [E, 2I]`` interleaved the same way; ``down_proj [E, I, H]`` input-major;
  ``down_proj_bias [E, H]``. Expert MLP: ``g = min(gate, limit)``, ``u = clamp(up, -limit, limit)``,
  ``down((u + 1) * g * sigmoid(alpha * g))``.

The conversions (:func:`split_gate_up`, :func:`join_gate_up`, ...) are pure and exact (slices,
transposes, concatenation). On the meta device (the streaming loader's skeleton) they give meta tensors
of the right shapes; :func:`split_fused_state` then maps the fused checkpoint tensors to the per-expert
names when the weights arrive, and :func:`fuse_expert_tensors` goes back (GGUF export, transformers'
fused layout).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import inspect
import re
from collections.abc import Iterator

import torch
from torch import nn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from signround.errors import SignRoundError


class ExpertLayout(enum.Enum):
    """How a family stores its fused expert tensors (see the module docstring for the shapes)."""

    OUTPUT_MAJOR = "output_major"
    GPT_OSS = "gpt_oss"


# Exact classes (not isinstance): a subclass may change the forward this module reproduces.
KNOWN_EXPERTS: dict[type[nn.Module], ExpertLayout] = {
    Qwen3MoeExperts: ExpertLayout.OUTPUT_MAJOR,
    MixtralExperts: ExpertLayout.OUTPUT_MAJOR,
    OlmoeExperts: ExpertLayout.OUTPUT_MAJOR,
    DeepseekV3Experts: ExpertLayout.OUTPUT_MAJOR,
    GptOssExperts: ExpertLayout.GPT_OSS,
}

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


# ---- pure layout conversions (batched over experts; per-expert slices are nn.Linear [out, in]) ----


def split_gate_up(gate_up: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``gate_up_proj`` -> ``(gate, up)``, each ``[E, I, H]`` (expert ``e``'s ``nn.Linear`` weight
    is ``gate[e]``). OUTPUT_MAJOR input ``[E, 2I, H]`` (gate rows first); GPT_OSS input ``[E, H, 2I]``
    (interleaved columns). Views of ``gate_up``; :func:`per_expert` copies them out."""
    if layout is ExpertLayout.OUTPUT_MAJOR:
        gate, up = gate_up.chunk(2, dim=1)
        return gate, up
    return gate_up[..., 0::2].transpose(1, 2), gate_up[..., 1::2].transpose(1, 2)


def join_gate_up(gate: torch.Tensor, up: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Inverse of :func:`split_gate_up`: ``gate, up [E, I, H]`` -> the fused ``gate_up_proj`` (a new tensor)."""
    if layout is ExpertLayout.OUTPUT_MAJOR:
        return torch.cat([gate, up], dim=1)
    e, i, h = gate.shape
    return torch.stack([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1).reshape(e, h, 2 * i)


def split_down(down: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Fused ``down_proj`` (OUTPUT_MAJOR ``[E, H, I]``, GPT_OSS ``[E, I, H]``) -> ``[E, H, I]`` (a view)."""
    return down if layout is ExpertLayout.OUTPUT_MAJOR else down.transpose(1, 2)


def join_down(down: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """Inverse of :func:`split_down`: ``[E, H, I]`` -> the fused ``down_proj`` (contiguous)."""
    return (down if layout is ExpertLayout.OUTPUT_MAJOR else down.transpose(1, 2)).contiguous()


def split_gate_up_bias(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss ``gate_up_proj_bias [E, 2I]`` (interleaved) -> ``(gate, up)`` biases, each ``[E, I]`` (views)."""
    return bias[:, 0::2], bias[:, 1::2]


def join_gate_up_bias(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_gate_up_bias`: ``gate, up [E, I]`` -> ``[E, 2I]`` interleaved."""
    return torch.stack([gate, up], dim=-1).reshape(gate.shape[0], 2 * gate.shape[1])


def per_expert(t: torch.Tensor) -> list[torch.Tensor]:
    """``[E, ...]`` -> ``E`` contiguous tensors ``[...]``, each with its own storage.

    Copies, not views: views would keep the whole fused tensor alive after the fused module is gone, and
    safetensors refuses to save tensors that share memory."""
    return [x.clone(memory_format=torch.contiguous_format) for x in t]


# ---- the modules that replace the fused ones ----


class ExpertMLP(nn.Module):
    """One SwiGLU-style expert: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, ``x [T, H] -> [T, H]``."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GptOssExpertMLP(nn.Module):
    """One gpt-oss expert (``GptOssExperts._apply_gate``): gate clamped above at ``limit``, up clamped
    to ``[-limit, limit]``, ``down_proj((up + 1) * gate * sigmoid(alpha * gate))``; linears with bias."""

    def __init__(
        self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, alpha: float, limit: float
    ) -> None:
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.alpha = alpha
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x).clamp(min=None, max=self.limit)
        up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of an OUTPUT_MAJOR fused experts module: a list of :class:`ExpertMLP`, so the
    linears are named ``<name>.{e}.gate_proj`` (etc.).

    ``forward(hidden_states [T, H], top_k_index [T, k] int, top_k_weights [T, k]) -> [T, H]``, the
    signature and result of the fused module's eager forward (same expert order, same token order)."""

    layout = ExpertLayout.OUTPUT_MAJOR

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return route(self, hidden_states, top_k_index, top_k_weights)


class UnfusedGptOssExperts(UnfusedExperts):
    """Drop-in replacement of ``GptOssExperts``: a list of :class:`GptOssExpertMLP`, with its forward's
    argument names ``(hidden_states, router_indices, routing_weights)``."""

    layout = ExpertLayout.GPT_OSS

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_indices: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if router_indices is None or routing_weights is None:
            raise TypeError("UnfusedGptOssExperts.forward needs router_indices and routing_weights")
        return route(self, hidden_states, router_indices, routing_weights)


def route(experts: nn.ModuleList, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over each token's chosen experts of ``weight * expert(token)``: ``hidden [T, H]``, ``index`` and
    ``weights [T, k]`` -> ``[T, H]`` in ``hidden``'s dtype.

    Mirrors transformers' eager loop: experts in ascending order, each one's tokens ordered by top-k slot
    then token, accumulated with ``index_add_``. An index outside ``[0, E)`` (the expert-parallel sentinel
    ``E``) selects nothing; an expert no token chose is not run."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(experts):
        slot, token = torch.where(index.T == e)
        if token.numel() == 0:
            continue
        y = expert(hidden[token]) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` holding exactly ``weight [out, in]`` (and ``bias [out]``), on their device."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return layer


def unfused_from(module: nn.Module, layout: ExpertLayout) -> UnfusedExperts:
    """The :class:`UnfusedExperts` (or :class:`UnfusedGptOssExperts`) equal to the fused ``module``: weights
    copied exactly, same dtype and device (meta stays meta, with the right shapes)."""
    grad = module.down_proj.requires_grad
    gate, up = split_gate_up(module.gate_up_proj.data, layout)
    weights = zip(per_expert(gate), per_expert(up), per_expert(split_down(module.down_proj.data, layout)), strict=True)
    if layout is ExpertLayout.OUTPUT_MAJOR:
        return UnfusedExperts(
            ExpertMLP(
                _linear(g, None, grad), _linear(u, None, grad), _linear(d, None, grad), copy.deepcopy(module.act_fn)
            )
            for g, u, d in weights
        )
    gate_b, up_b = split_gate_up_bias(module.gate_up_proj_bias.data)
    biases = zip(per_expert(gate_b), per_expert(up_b), per_expert(module.down_proj_bias.data), strict=True)
    return UnfusedGptOssExperts(
        GptOssExpertMLP(_linear(g, gb, grad), _linear(u, ub, grad), _linear(d, db, grad), module.alpha, module.limit)
        for (g, u, d), (gb, ub, db) in zip(weights, biases, strict=True)
    )


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace, in place, every fused experts module of a known family (:data:`KNOWN_EXPERTS`, matched by
    exact class) by its :class:`UnfusedExperts`; return the replaced modules' names, in module order.

    Works on real and meta parameters alike. A module of an unknown family holding 3D parameters is left
    alone and *not* an error here: :func:`find_fused_experts` names what remains, so the caller can refuse
    it with a message that fits its context."""
    names = [n for n, m in model.named_modules() if type(m) in KNOWN_EXPERTS]
    for name in names:  # by name, holding no fused module past its replacement: one layer's copy at a time
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        fused = getattr(parent, child)
        setattr(parent, child, unfused_from(fused, KNOWN_EXPERTS[type(fused)]))
        del fused
    return names


def find_fused_experts(model: nn.Module) -> list[str]:
    """Names of the modules that hold a parameter of 3 or more dimensions directly (fused experts that
    :func:`unfuse_experts` did not convert, i.e. an unsupported family). Convolutions (``[out, in, k...]``
    weights, e.g. Mamba's conv1d) are not experts and are not listed."""
    return [
        name
        for name, module in model.named_modules()
        if not isinstance(module, nn.modules.conv._ConvNd) and any(p.dim() >= 3 for p in module.parameters(False))
    ]


# ---- state dicts: fused checkpoint names <-> per-expert names ----


def _prefix(module_name: str) -> str:
    return f"{module_name}." if module_name else ""


# fused name -> (per-expert projections it holds, the tensor kind they get)
FUSED_NAMES = {
    "gate_up_proj": (("gate_proj", "up_proj"), "weight"),
    "down_proj": (("down_proj",), "weight"),
    "gate_up_proj_bias": (("gate_proj", "up_proj"), "bias"),
    "down_proj_bias": (("down_proj",), "bias"),
}


def _split_one(fused: str, t: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, ...]:
    """The batched per-expert tensors (``[E, out, in]`` or ``[E, out]``) of one fused tensor."""
    if fused.endswith("_bias") and layout is not ExpertLayout.GPT_OSS:
        raise SignRoundError(f"{fused} found, but the {layout.value} experts layout has no biases")
    if fused == "gate_up_proj":
        return split_gate_up(t, layout)
    if fused == "down_proj":
        return (split_down(t, layout),)
    return split_gate_up_bias(t) if fused == "gate_up_proj_bias" else (t,)


def _join_one(fused: str, parts: list[torch.Tensor], layout: ExpertLayout) -> torch.Tensor:
    """Inverse of :func:`_split_one`."""
    if fused == "gate_up_proj":
        return join_gate_up(*parts, layout)
    if fused == "down_proj":
        return join_down(parts[0], layout)
    return join_gate_up_bias(*parts) if fused == "gate_up_proj_bias" else parts[0]


def split_expert_tensors(
    module_name: str, state: dict[str, torch.Tensor], layout: ExpertLayout
) -> dict[str, torch.Tensor]:
    """``state`` with the fused tensors of the experts module ``module_name`` replaced by per-expert ones.

    With ``p = module_name + "."``: ``{p}gate_up_proj`` -> ``{p}{e}.gate_proj.weight`` and
    ``{p}{e}.up_proj.weight`` (``[I, H]``); ``{p}down_proj`` -> ``{p}{e}.down_proj.weight`` (``[H, I]``);
    GPT_OSS only: ``{p}gate_up_proj_bias`` -> ``{p}{e}.gate_proj.bias`` / ``up_proj.bias`` (``[I]``),
    ``{p}down_proj_bias`` -> ``{p}{e}.down_proj.bias`` (``[H]``). Every other key (per-expert checkpoint
    tensors already, a shard without this module) passes through; ``state`` itself is not modified. Names
    are relative to whatever ``state`` is relative to (a block, the whole model).

    Raises:
        SignRoundError: a bias for a layout that has none.
    """
    p = _prefix(module_name)
    out = dict(state)
    for fused, (projections, kind) in FUSED_NAMES.items():
        if (t := out.pop(p + fused, None)) is None:
            continue
        for proj, batched in zip(projections, _split_one(fused, t, layout), strict=True):
            for e, x in enumerate(per_expert(batched)):
                out[f"{p}{e}.{proj}.{kind}"] = x
    return out


def split_fused_state(root: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`split_expert_tensors` for every :class:`UnfusedExperts` inside ``root``, with ``state``'s keys
    relative to ``root`` (a model, or one block for the streaming loader): the state to load into an
    unfused skeleton (``root.load_state_dict(split_fused_state(root, state), assign=True)``)."""
    for name, module in root.named_modules():
        if isinstance(module, UnfusedExperts):
            state = split_expert_tensors(name, state, module.layout)
    return state


def fuse_expert_tensors(
    module_name: str, state: dict[str, torch.Tensor], layout: ExpertLayout
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_expert_tensors`: ``state`` with the per-expert tensors ``{p}{e}.*_proj.*``
    (experts ``0 .. E-1``) replaced by the fused ``{p}gate_up_proj``, ``{p}down_proj`` (and the GPT_OSS
    biases) in ``layout``; other keys pass through. For llama.cpp's ``ffn_gate_exps`` / ``ffn_up_exps`` /
    ``ffn_down_exps``, ``torch.stack`` the per-expert weights instead (``[E, I, H]``, ``[E, I, H]``,
    ``[E, H, I]``: ``nn.Linear`` rows, as gguf-py expects).

    Raises:
        SignRoundError: an expert is missing from a projection, gate without up (or the reverse), or a
            bias for a layout that has none.
    """
    p = _prefix(module_name)
    pattern = re.compile(rf"{re.escape(p)}(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)")
    found: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out = {}
    for key, t in state.items():
        if m := pattern.fullmatch(key):
            found.setdefault((m[2], m[3]), {})[int(m[1])] = t
        else:
            out[key] = t
    count = max((max(per) + 1 for per in found.values()), default=0)
    for fused, (projections, kind) in FUSED_NAMES.items():
        present = [found.get((proj, kind)) for proj in projections]
        if all(per is None for per in present):
            continue
        if any(per is None for per in present):
            raise SignRoundError(f"{p}{{e}}.{' and '.join(projections)} ({kind}) must all be present to fuse them")
        for proj, per in zip(projections, present, strict=True):
            if missing := sorted(set(range(count)) - set(per)):
                raise SignRoundError(f"{p}{{e}}.{proj}.{kind} is missing for experts {missing[:5]} of {count}")
        if kind == "bias" and layout is not ExpertLayout.GPT_OSS:
            raise SignRoundError(f"per-expert biases under {p[:-1]}, but the {layout.value} layout has none")
        out[p + fused] = _join_one(fused, [torch.stack([per[e] for e in range(count)]) for per in present], layout)
    return out


def _index_parameter(module: UnfusedExperts) -> str:
    """The name of ``module.forward``'s routing-index parameter (its second)."""
    return list(inspect.signature(module.forward).parameters)[1]


@contextlib.contextmanager
def experts_pre_hooks(block: nn.Module, hook, with_kwargs: bool = False) -> Iterator[None]:
    """Within the context, ``hook(name, module, args[, kwargs])`` runs before the forward of every
    :class:`UnfusedExperts` in ``block`` (``name`` relative to ``block``); its return value replaces the
    arguments as in ``nn.Module.register_forward_pre_hook``."""
    handles = [
        m.register_forward_pre_hook(lambda m, *a, n=n: hook(n, m, *a), with_kwargs=with_kwargs)
        for n, m in block.named_modules()
        if isinstance(m, UnfusedExperts)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def routed_tokens(block: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the context, count how many tokens each expert of every :class:`UnfusedExperts` in ``block``
    is routed (top-k choices: a token counts once for each expert it picks). Yields ``{module name: int64
    [E]}`` (relative to ``block``), filled as the block runs."""
    counts: dict[str, torch.Tensor] = {}

    def hook(name: str, module: UnfusedExperts, args: tuple, kwargs: dict) -> None:
        # the routing indices are forward's second parameter (top_k_index, or gpt-oss's router_indices)
        index = args[1] if len(args) > 1 else kwargs[_index_parameter(module)]
        flat = index.reshape(-1)
        seen = torch.bincount(flat[(flat >= 0) & (flat < len(module))].long().cpu(), minlength=len(module))
        counts[name] = counts[name] + seen if name in counts else seen

    with experts_pre_hooks(block, hook, with_kwargs=True):
        yield counts


class RoutingTape:
    """The float model's routing of the calibration samples, recorded and replayed (``--routing teacher``).

    :meth:`recording` stores, for every :class:`UnfusedExperts` of a block, the routing indices and weights
    its forward receives while the float block runs: ``index[name]`` and ``weights[name]`` ``[n, seqlen, k]``
    (sample-major, as the block's inputs). Inside :meth:`replaying`, a forward call of those modules gets the
    recorded routing of the samples :attr:`batch` names (a 1-D index tensor into ``n``; None: the module's own
    routing), so the student's experts see exactly the tokens and gate weights the teacher's did."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.index: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.batch: torch.Tensor | None = None

    @contextlib.contextmanager
    def recording(self, block: nn.Module, seqlen: int) -> Iterator[RoutingTape]:
        def hook(name: str, _module: nn.Module, args: tuple) -> None:
            self._parts.setdefault(name, []).append((args[1].detach(), args[2].detach()))

        try:
            with experts_pre_hooks(block, hook):
                yield self
        finally:
            for name, parts in self._parts.items():
                k = parts[0][0].shape[-1]
                self.index[name] = torch.cat([i.reshape(-1, k) for i, _ in parts]).reshape(-1, seqlen, k)
                self.weights[name] = torch.cat([w.reshape(-1, k) for _, w in parts]).reshape(-1, seqlen, k)
            self._parts.clear()

    @contextlib.contextmanager
    def replaying(self, block: nn.Module) -> Iterator[RoutingTape]:
        def hook(name: str, _module: nn.Module, args: tuple) -> tuple | None:
            if self.batch is None or name not in self.index:
                return None
            index, weights = self.index[name][self.batch], self.weights[name][self.batch]
            k = index.shape[-1]
            return (args[0], index.reshape(-1, k), weights.reshape(-1, k).to(args[2].dtype), *args[3:])

        try:
            with experts_pre_hooks(block, hook):
                yield self
        finally:
            self.batch = None
