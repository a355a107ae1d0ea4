"""The normalization zoo: one file per family of layers, a registry of schemes by name, and the
speed paths behind one seam.

* registry.py: ``get_scheme(name)`` -> how a scheme builds its layers (models never branch on
  the scheme), ``available_norms()``, ``eps_of``, ``resolve_groups``;
* norm_act.py: :class:`NormAct`, a norm and the non-linearity after it, as one unit;
* the families, each with its paper's equation written out term by term, a plain-PyTorch
  reference of it and the layer: batch_norm.py, ghost_batch_norm.py, batch_renorm.py,
  group_norm.py (GN, LN, IN), filter_response.py (FRN + TLU), evonorm.py (EvoNorm-S0),
  weight_standardization.py (WS, scaled WS, the scaled ReLU), sync_batch_norm.py;
* tracing.py: ``recording()``, true only while a model is recorded into a program
  (``torch.jit.trace``, ``torch.export``), when layers use their plain-PyTorch reference;
* speed/: what makes the layers fast on CPU (fused C++ kernels, primitives on PyTorch's
  kernels, hand-written backward passes); the families call it through one function each.

What each scheme computes is specified in docs/methods.md, one section per name.
"""
from normbench.norms.norm_act import NormAct
from normbench.norms.registry import (DEFAULT_GROUPS, NormScheme, available_norms, eps_of, get_scheme, register,
                                      resolve_groups)

__all__ = ["NormAct", "NormScheme", "DEFAULT_GROUPS", "available_norms", "eps_of", "get_scheme", "register",
           "resolve_groups"]
