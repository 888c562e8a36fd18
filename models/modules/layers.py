"""Small building blocks shared by the model families.

``layer_norm`` and ``linear`` are the one place that picks NVIDIA apex's fused kernels:
when apex is importable and CUDA is available, else the torch modules. Parameter names
are the same either way (``weight``, ``bias``), so checkpoints move freely between the two.
apex is an optional extra built from source; the PyPI package named ``apex`` is unrelated.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.lru_cache(maxsize=None)
def apex_fused() -> dict:
    """apex's fused modules when usable here, else an empty dict."""
    if not torch.cuda.is_available():
        return {}
    found = {}
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore

        found["layer_norm"] = FusedLayerNorm
    except ImportError:
        pass
    try:
        from apex.fused_dense import FusedDense  # type: ignore

        found["dense"] = FusedDense
    except ImportError:
        pass
    return found


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


def layer_norm(d: int, eps: float = 1e-5) -> nn.Module:
    fused = apex_fused().get("layer_norm")
    if fused is None:
        return LayerNorm(d, eps=eps)

    class FusedLayerNorm(_Freezable, fused):  # apex falls back to F.layer_norm for CPU tensors by itself
        def forward(self, x: Tensor) -> Tensor:
            if self.frozen:
                return F.layer_norm(x, self.normalized_shape, self._p("weight"), self._p("bias"), self.eps)
            return super().forward(x)

    return FusedLayerNorm(d, eps=eps)


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
    if bias and "dense" in apex_fused():
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
