"""Fused multi-tensor retention kernels (Triton) with pure-torch references.

Ops (one module each): ``ewc_penalty_`` and ``fisher_accumulate_`` for EWC, ``gem_dots`` and
``gem_project_`` for GEM / A-GEM. Each works on lists of tensors (all the trainable parameters) in one or a
few launches, edits gradients in place and allocates nothing model-sized. ``resolve_backend`` and the
``HFT_KERNELS_BACKEND`` environment variable choose between the Triton kernels and the references.
``linear_kl_div`` (the KL anchor's term) is a pure-torch op on logits, no Triton: the KL to a reference's
logits, built chunk by chunk from its hidden states.

This package imports torch and (optionally) triton only: never Lightning, transformers or hft_lightning.
"""

from hft_kernels.backend import BACKEND_ENV_VAR, BACKENDS, HAS_TRITON, resolve_backend
from hft_kernels.ewc import ewc_penalty_
from hft_kernels.fisher import fisher_accumulate_
from hft_kernels.gem_dots import gem_dots
from hft_kernels.gem_project import MAX_REFS, gem_project_
from hft_kernels.kl_div import linear_kl_div, linear_kl_div_reference

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "HAS_TRITON",
    "MAX_REFS",
    "ewc_penalty_",
    "fisher_accumulate_",
    "gem_dots",
    "gem_project_",
    "linear_kl_div",
    "linear_kl_div_reference",
    "resolve_backend",
]
