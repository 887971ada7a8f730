"""Few-shot methods behind one interface, by registry name.

Frozen-feature methods (``inputs == "features"``) fit on cached embeddings; fine-tuning methods
(``inputs == "images"``) on normalised images. ``create_method(name, context, **params)`` builds one.
"""

# Importing the method modules fills the registry.
from fewshot_med.methods import (  # noqa: F401
    anil,
    bd_cspn,
    finetune,
    laplace_logreg,
    logreg,
    protonet,
    pt_map,
    r2d2,
    simpleshot,
    tim,
)
from fewshot_med.methods.base import (
    METHODS,
    FewShotMethod,
    MethodContext,
    NotFittedError,
    create_method,
    register_method,
)

__all__ = [
    "METHODS",
    "FewShotMethod",
    "MethodContext",
    "NotFittedError",
    "create_method",
    "register_method",
]
