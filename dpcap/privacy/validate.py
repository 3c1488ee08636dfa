"""Refuse, at construction, any model the clipper cannot make private (invariant 2).

Every trainable parameter must be covered by exactly one layer handler, and nothing may mix
samples: batch-statistics normalisation (BatchNorm, SyncBatchNorm, InstanceNorm with running stats)
couples examples, so no per-sample gradient exists. A handler also refuses subclasses whose
`forward` its maths does not describe, and options it does not implement; input ranks, known only at
forward time, are checked at each recorded forward call (`LayerHandler.check_call`).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from dpcap.errors import PrivacyError

from .layers import LayerHandler, LayerRegistry


def sample_mixing_modules(model: nn.Module) -> list[str]:
    """Names of modules whose output for one sample depends on other samples of the batch."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats)
    ]


def plan_layers(model: nn.Module, registry: LayerRegistry) -> list[tuple[str, nn.Module, LayerHandler]]:
    """(name, module, handler) for every module owning trainable parameters; errors name what is uncovered."""
    mixing = sample_mixing_modules(model)
    if mixing:
        raise PrivacyError(f"these modules mix samples (batch statistics) and cannot be made private: {mixing}")
    planned, problems, owners = [], [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = {pname for pname, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        for pname in own:
            param_id = id(getattr(module, pname))
            if param_id in owners:
                problems.append(f"{name}.{pname} is shared with {owners[param_id]} (tied weights need a joint norm)")
            owners[param_id] = f"{name}.{pname}"
        handler = registry.lookup(module)
        label = f"{name or '<root>'} ({type(module).__name__})"
        if handler is None:
            problems.append(f"{label}: no per-sample gradient rule for parameters {sorted(own)}")
            continue
        reason = handler.check_forward(module) or handler.check(module)
        uncovered = own - handler.covers(module)
        if reason:
            problems.append(f"{label}: {reason}")
        elif uncovered:
            problems.append(f"{label}: parameters {sorted(uncovered)} are not covered")
        else:
            planned.append((name, module, handler))
    if problems:
        raise PrivacyError("cannot clip per sample; freeze or replace these parameters:\n  " + "\n  ".join(problems))
    return planned
