"""LoRALinear: a drop-in for ``nn.Linear`` running the gated LoRA op.

State-dict keys: ``weight``, ``bias`` (as in ``nn.Linear``, so a pretrained state dict still loads),
``lora_A`` [R, K], ``lora_B`` [N, R], ``rank_mask`` [R] (bool buffer) and, in SVD form, ``lora_E`` [R]
(AdaLoRA/ShapLoRA singular values ΔW = B·diag(E)·A).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lora_kernels.gated_lora import op as gated_op

from .config import SVD_INITS, check_adapter_dtype, check_features, check_finite, check_rank, is_binary


_UNREAD = object()  # "the mask was not read on the host" (torch.compile)


class LoRALinear(nn.Module):
    """``y = x Wᵀ + b + (alpha/r) · ((dropout(x) Aᵀ) ⊙ G) Bᵀ`` with W, b frozen.

    The gate G combines, in this order: the SVD values ``lora_E`` (``svd=True``), the rank mask, and a
    per-token gate set with :meth:`token_gate` (MoE routing, ShapLoRA coalitions). A fixed 0/1 mask runs
    on the active ranks only, so a masked layer costs what a dense rank-k LoRA costs.

    ``svd_init`` (SVD form only): ``"adalora"`` (PEFT's AdaLoRA init) or ``"lora"`` (LoRA's, E = 1): see
    :class:`~python_api.config.AdapterConfig`.

    Shared adapters (ShareLoRA) pass existing ``lora_A`` / ``lora_B`` Parameters; they are held by
    reference, so one Parameter serves every layer that shares it.
    """

    svd_init = "adalora"   # a layer pickled before svd_init existed reads this

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float | None = None,
                 dropout: float = 0.0, bias: bool = True, svd: bool = False,
                 lora_A: nn.Parameter | None = None, lora_B: nn.Parameter | None = None,
                 device=None, dtype=None, adapter_dtype=None, svd_init: str = "adalora",
                 _base: nn.Linear | None = None):
        super().__init__()
        r = check_rank("r", r)
        in_features, out_features = check_features(in_features, out_features)
        if alpha is not None:
            alpha = check_finite("alpha", alpha, positive=True)   # NaN/inf: every output NaN/inf; 0: no adapter
        dropout = check_finite("dropout", dropout, lo=0.0, hi=1.0)
        adapter_dtype = check_adapter_dtype(adapter_dtype)
        if not isinstance(svd, bool):
            raise TypeError(f"svd must be True or False, got {svd!r}")
        if not isinstance(svd_init, str) or svd_init not in SVD_INITS:
            raise ValueError(f"svd_init must be one of {SVD_INITS}, got {svd_init!r}")
        for nm, given in (("lora_A", lora_A), ("lora_B", lora_B)):
            # a plain tensor would be an attribute, not a parameter: missing from parameters() (no optimizer step),
            # state_dict() and .to() / .double()
            if given is not None and (not isinstance(given, nn.Parameter) or not given.is_floating_point()):
                raise TypeError(f"{nm} must be an nn.Parameter of a floating dtype (a shared adapter), got "
                                f"{type(given).__name__}" + (f" of dtype {given.dtype}"
                                                             if isinstance(given, torch.Tensor) else ""))
        if r > min(in_features, out_features):
            # A rank above min(K, N) adds parameters but no expressiveness: refuse (MoE layers stack experts
            # and call the functional op directly, where R is free).
            raise ValueError(f"r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha = float(alpha if alpha is not None else r)
        self.scaling = self.lora_alpha / r
        self.dropout = float(dropout)
        self.svd = bool(svd)
        self.svd_init = str(svd_init)
        if _base is not None:
            self.weight = _base.weight
            self.bias = _base.bias
            self.weight.requires_grad_(False)
            if self.bias is not None:
                self.bias.requires_grad_(False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
            self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if adapter_dtype is None:
            # Half-precision bases keep fp32 adapters (master weights), as PEFT does by default.
            adapter_dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        afactory = {"device": self.weight.device, "dtype": adapter_dtype}
        self.lora_A = lora_A if lora_A is not None else nn.Parameter(torch.empty(r, in_features, **afactory))
        self.lora_B = lora_B if lora_B is not None else nn.Parameter(torch.empty(out_features, r, **afactory))
        self._check_adapter_shapes()
        self.lora_E = nn.Parameter(torch.zeros(r, **afactory)) if svd else None
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=self.weight.device))
        self._token_gate: torch.Tensor | None = None
        self._active_cache: tuple | None = None
        self.merged = False
        self._original_weight: list | None = None
        self.reset_lora_parameters(init_a=lora_A is None, init_b=lora_B is None)

    def _check_adapter_shapes(self):
        if tuple(self.lora_A.shape) != (self.r, self.in_features):
            raise ValueError(f"lora_A must be [r, in_features] = [{self.r}, {self.in_features}], "
                             f"got {tuple(self.lora_A.shape)}")
        if tuple(self.lora_B.shape) != (self.out_features, self.r):
            raise ValueError(f"lora_B must be [out_features, r] = [{self.out_features}, {self.r}], "
                             f"got {tuple(self.lora_B.shape)}")

    @torch.no_grad()
    def reset_lora_parameters(self, init_a: bool = True, init_b: bool = True):
        """A fresh adapter: A and B (``init_a`` / ``init_b``; a shared matrix is its owner's to initialise), E for
        the SVD form, and every rank on (e.g. after ``to_empty`` from the meta device, where the buffers hold
        whatever the memory held). Refused on a merged layer (its weight holds the old ΔW): ``unmerge()`` first."""
        if self.merged:
            raise RuntimeError("unmerge() before resetting the adapters of a merged layer (its weight holds ΔW)")
        self.rank_mask.fill_(True)
        if self.svd and self.svd_init == "lora":
            # LoRA's init in SVD form: A kaiming-uniform, B = 0, E = 1. ΔW starts at zero and trains from the first
            # step as plain LoRA does (B's gradient is A·x, not scaled down by E and a small A)
            if init_a:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init_b:
                nn.init.zeros_(self.lora_B)
            self.lora_E.fill_(1.0)
        elif self.svd:
            # AdaLoRA's init: A, B ~ N(0, 0.02), E = 0, so ΔW starts at zero but A, B get gradients.
            if init_a:
                nn.init.normal_(self.lora_A, std=0.02)
            if init_b:
                nn.init.normal_(self.lora_B, std=0.02)
            self.lora_E.zero_()
        else:
            if init_a:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init_b:
                nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                    svd: bool = False, lora_A: nn.Parameter | None = None, lora_B: nn.Parameter | None = None,
                    adapter_dtype=None, svd_init: str = "adalora") -> "LoRALinear":
        """Wraps an existing ``nn.Linear``: its weight and bias are taken by reference (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(linear.in_features, linear.out_features, r, alpha, dropout, bias=linear.bias is not None,
                   svd=svd, lora_A=lora_A, lora_B=lora_B, adapter_dtype=adapter_dtype, svd_init=svd_init,
                   _base=linear)

    # ---- rank mask / gates -------------------------------------------------------------------------
    @torch.no_grad()
    def set_rank_mask(self, mask) -> None:
        """Switch ranks on/off. ``mask``: bool (or 0/1) sequence/tensor of length r."""
        if mask is None or isinstance(mask, (str, bytes)):
            raise TypeError(f"mask must be a bool or 0/1 sequence or tensor of length r={self.r}, got {mask!r}")
        try:
            mask = torch.as_tensor(mask, device=self.rank_mask.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"mask must be a bool or 0/1 sequence or tensor of length r={self.r}: {e}") from None
        if mask.dim() != 1 or mask.shape[0] != self.r:
            raise ValueError(f"mask length must equal r={self.r}, got shape {tuple(mask.shape)}")
        if not is_binary(mask):
            raise ValueError("mask must be boolean or 0/1 valued")
        mask = mask.bool()
        if self.merged:
            raise RuntimeError("unmerge() before changing the rank mask of a merged layer")
        self.rank_mask.copy_(mask)

    @property
    def active_rank(self) -> int:
        return int(self.rank_mask.sum())

    def set_token_gate(self, gate: torch.Tensor | None) -> None:
        """Per-token gate [T, r] (or None) multiplied into the rank gate for the following forwards."""
        self._token_gate = gate

    def rank_gate(self) -> torch.Tensor | None:
        """The per-rank gate [r] the op sees (None when it is all ones and not trainable)."""
        if self.svd:
            return self.lora_E * self.rank_mask.to(self.lora_E.dtype)
        if self._active_indices() is None:
            return None
        return self.rank_mask.to(self.lora_A.dtype)

    def _active_indices(self):
        """Active-rank indices of the mask (None: every rank on), cached so the host reads the mask only when it
        changes. The cache holds the mask tensor itself and its version: a mask replaced (``load_state_dict(...,
        assign=True)``, even at the freed tensor's address) or changed in place (``set_rank_mask``, ``copy_``,
        ``load_state_dict``) is read again. On CPU the cached copy's values are also compared (r booleans, no
        device sync), which catches edits through ``rank_mask.data``; on a GPU that comparison would sync the
        device every forward, so there edit the mask with ``set_rank_mask`` or in place, not through ``.data``.
        Under torch.compile the mask is not read on the host: the 0/1 gate then zeroes the masked ranks (same
        values, full-rank cost)."""
        if torch.compiler.is_compiling():
            return _UNREAD
        mask, c = self.rank_mask, self._active_cache
        if c is None or c[0] is not mask or c[1] != mask._version or (
                mask.device.type == "cpu" and not torch.equal(c[2], mask)):
            # never cache an inference tensor (computed under torch.inference_mode): a later training step could
            # not save it for backward
            with torch.inference_mode(False):
                self._active_cache = (mask, mask._version, mask.clone(), gated_op.active_ranks(mask))
        return self._active_cache[3]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B diag(g) A  [N, K] for the current rank gate (no per-token gate)."""
        g = self.rank_gate()
        b = self.lora_B if g is None else self.lora_B * g
        return (b @ self.lora_A) * self.scaling

    def op_gate(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(gate, active)`` for the op: the rank gate times the token gate, and the cached active-rank indices
        of the mask (the op decides whether to compact: :func:`lora_kernels.gated_lora.op.compacted_ranks`)."""
        gate = self.rank_gate()
        if self._token_gate is not None:
            tg = self._token_gate
            return (tg if gate is None else tg * gate.to(tg.dtype)), None
        active = self._active_indices()
        return gate, (active if isinstance(active, torch.Tensor) else None)

    # ---- forward / merge ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        gate, active = self.op_gate()
        # The active ranks come from this layer's own validated mask: the op trusts them (no host read per call).
        return gated_op._lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, gate,
                                     self.dropout, self.training, active, None, None, None, check_active=False)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW. The merged weight is a new Parameter and the original is kept aside untouched, so
        :meth:`unmerge` restores it bit-exactly and a weight tied to another module (``lm_head`` ↔ ``wte``) is never
        changed under that module. A per-token gate has no merged form: refused."""
        if self.merged:
            return
        if self._token_gate is not None:
            raise ValueError("merge() with a per-token gate set: a merged weight cannot express a per-token gate; "
                             "call set_token_gate(None) first")
        # Summed in fp32 for half weights and in fp64 for fp64 ones (through fp32 an fp64 layer would be off by ~1e-8).
        cd = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.delta_weight()
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("merge(): the adapter delta B·diag(g)·A has NaN/Inf values; the layer stays unmerged")
        merged = (self.weight.to(cd) + delta.to(cd)).to(self.weight.dtype)
        self._original_weight = [self.weight]   # a list: kept out of parameters() and state_dict()
        self.weight = nn.Parameter(merged, requires_grad=False)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        (orig,) = self._original_weight
        if orig.device != self.weight.device or orig.dtype != self.weight.dtype:   # moved or cast while merged
            orig.data = orig.data.to(self.weight.device, self.weight.dtype)
        self.weight = orig
        self._original_weight = None
        self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A merged layer saves its unmerged weight: with lora_A / lora_B beside it, W + ΔW would be applied twice by
        # any layer that loads the dict (a fresh one is unmerged). The state dict always holds the unmerged form.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            (orig,) = self._original_weight
            w = orig if keep_vars else orig.detach()
            destination[prefix + "weight"] = w.to(self.weight.device, self.weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the rank mask gets set_rank_mask's 0/1 check (the bool buffer's copy_ would turn 0.5 or -1 into True)
        mask = state_dict.get(prefix + "rank_mask")
        if isinstance(mask, torch.Tensor) and not is_binary(mask):
            raise ValueError(f"{prefix}rank_mask in the state dict must be boolean or 0/1 valued, got "
                             f"{mask.tolist() if mask.numel() <= 16 else mask.dtype}")
        # the dict holds the unmerged form (above): a merged layer takes it unmerged, then merges the loaded adapters.
        # If the load fails (a shape mismatch), the layer's own tensors go back, so it re-merges its OLD state rather
        # than a mix of loaded and old tensors that matches neither.
        was_merged = self.merged
        if was_merged:
            self.unmerge()
            stores = (("p", self._parameters), ("b", self._buffers))
            saved = {(kind, n): (t, t.detach().clone()) for kind, store in stores for n, t in store.items()
                     if t is not None}
        before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if was_merged:
            # only a wrong tensor fails here: missing / unexpected keys fail a strict load at its end, and the layer
            # cannot tell strict from non-strict (torch passes strict=True to every module), so those are left to
            # torch, which raises without rolling any module back
            if len(error_msgs) > before:
                with torch.no_grad():
                    for (kind, n), (obj, copy) in saved.items():
                        obj.copy_(copy)
                        (self._parameters if kind == "p" else self._buffers)[n] = obj
            self.merge()

    def extra_repr(self) -> str:
        active = "?" if self.rank_mask.is_meta else self.active_rank   # a model built on the meta device
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"active_rank={active}, alpha={self.lora_alpha}, dropout={self.dropout}, "
                f"svd={self.svd}{f', svd_init={self.svd_init}' if self.svd else ''}, bias={self.bias is not None}")
