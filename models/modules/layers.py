"""Small building blocks shared by the model families.

``layer_norm`` and ``linear`` are the one place that picks NVIDIA apex's fused kernels
(``choose_layer_norm`` / ``choose_linear``): apex's when it is importable and the model is
built on a CUDA machine (the trainer and evaluation then run it on CUDA; apex's FusedLayerNorm
itself falls back to ``F.layer_norm`` for CPU tensors), else the torch modules. Parameter names
are the same either way (``weight``, ``bias``), so checkpoints move freely between the two.
apex is an optional extra built from source; the PyPI package named ``apex`` is unrelated.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_APEX = {"layer_norm": ("apex.normalization", "FusedLayerNorm"), "dense": ("apex.fused_dense", "FusedDense")}


@functools.lru_cache(maxsize=None)
def apex_modules() -> dict:
    """NVIDIA apex's fused classes that import here (``{"layer_norm": FusedLayerNorm, ...}``).
    The PyPI ``apex`` has no such submodules; a broken install counts as absent."""
    found = {}
    for kind, (module, name) in _APEX.items():
        try:
            if importlib.util.find_spec(module) is not None:
                found[kind] = getattr(importlib.import_module(module), name)
        except Exception:   # no apex, another package named apex, or apex built without its CUDA parts
            pass
    return found


def build_device() -> str:
    """Where a model built now will run: the pipeline moves it to CUDA whenever CUDA is available."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_layer_norm(device_type: str, apex_available: bool) -> str:
    """``"apex"`` (FusedLayerNorm) on CUDA when apex's is importable, else ``"torch"``."""
    return "apex" if device_type == "cuda" and apex_available else "torch"


def choose_linear(device_type: str, apex_available: bool, bias: bool) -> str:
    """``"apex"`` (FusedDense: GEMM + bias in one kernel, used for half-precision CUDA inputs)
    on CUDA when importable and the layer has a bias, else ``"torch"``."""
    return "apex" if device_type == "cuda" and apex_available and bias else "torch"


class _Freezable:
    """A module whose forward can see its parameters detached (``weights_detached``)."""

    frozen = False

    def _p(self, name: str):
        p = getattr(self, name)
        return p.detach() if (self.frozen and p is not None) else p


@contextlib.contextmanager
def weights_detached(*modules: nn.Module) -> Iterator[None]:
    """Within the block these modules' forwards use their parameters detached: no gradient
    reaches the parameters, inputs still get theirs, and no parameter's ``requires_grad`` changes.
    The module is still *called*, so hooks that gather partitioned parameters before a forward
    (DeepSpeed ZeRO-3) still run; reading ``module.weight`` outside its forward would see an
    empty partition there."""
    for m in modules:
        if not isinstance(m, _Freezable):
            raise TypeError(f"{type(m).__name__} cannot run with its weights detached (not built by "
                            f"models.modules.layers)")
    saved = [m.frozen for m in modules]
    for m in modules:
        m.frozen = True
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.frozen = f


class LayerNorm(_Freezable, nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self._p("weight"), self._p("bias"), self.eps)


@functools.lru_cache(maxsize=None)
def _fused_layer_norm(base: type) -> type:
    """apex's LayerNorm class (``base``) made freezable: ``weights_detached`` runs F.layer_norm."""

    class FusedLayerNorm(_Freezable, base):
        def forward(self, x: Tensor) -> Tensor:
            if self.frozen:
                return F.layer_norm(x, self.normalized_shape, self._p("weight"), self._p("bias"), self.eps)
            return super().forward(x)

    return FusedLayerNorm


def layer_norm(d: int, eps: float = 1e-5) -> nn.Module:
    fused = apex_modules().get("layer_norm")
    if choose_layer_norm(build_device(), fused is not None) == "apex":
        return _fused_layer_norm(fused)(d, eps=eps)
    return LayerNorm(d, eps=eps)


class Linear(_Freezable, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._p("weight"), self._p("bias"))


class _FusedDenseOrLinear(Linear):
    """apex FusedDense (GEMM + bias in one kernel) on CUDA tensors, F.linear elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from apex.fused_dense import fused_dense_function  # type: ignore

            return fused_dense_function(x, self._p("weight"), self._p("bias"))
        return F.linear(x, self._p("weight"), self._p("bias"))


def linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    if choose_linear(build_device(), "dense" in apex_modules(), bias) == "apex":
        return _FusedDenseOrLinear(d_in, d_out, bias=True)
    return Linear(d_in, d_out, bias=bias)


class PositionwiseFF(nn.Module):
    """ReLU feed-forward block with the reference's dropout sites and residual + LayerNorm.

    post-LN (default): ``LN(x + Drop(W2 Drop(ReLU(W1 x))))``; pre-LN: ``x + Drop(W2 Drop(ReLU(W1 LN(x))))``.
    """

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool = False):
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.ff1 = linear(d_model, d_inner)
        self.ff2 = linear(d_inner, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = layer_norm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x) if self.pre_lnorm else x
        h = self.drop(self.ff2(self.drop(F.relu(self.ff1(h)))))
        return x + h if self.pre_lnorm else self.norm(x + h)
