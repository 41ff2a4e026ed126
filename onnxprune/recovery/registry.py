"""The recovery-method registry: each ``--recover`` choice is one entry, declared where its maths lives.

A method declares what the rest of the tool needs to know about it (its help text, whether it needs calibration
data, whether it can choose which weights are zero while it fits, which ops it revisits and in what order) and a
*fitter*: made once per sweep over the pruned model (recover.py), it fixes one node at a time. Adding a method is a
new module with one ``@register`` and an import in ``recovery/__init__.py``; the CLI choices, the pipeline's checks
and the sweep read everything from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import onnx

from onnxprune.errors import ConfigError

if TYPE_CHECKING:  # the driver imports this module; the types are only named here
    from onnxprune.recovery.recover import LayerFix, Recovery, RecoveryResult


class Fitter(Protocol):
    """One sweep's worth of a method: fixes nodes in fit order, then may revisit the whole result."""

    def fix(self, node: onnx.NodeProto) -> LayerFix | str | None:
        """Fix ``node`` (downstream of a change, one of the method's ops) in place.

        Returns:
            What was done to it, or a reason it was skipped (becomes a note), or None when it needs nothing.
        """

    def finish(self, result: RecoveryResult, backup: onnx.ModelProto) -> None:
        """After the sweep, before the end-to-end guard: e.g. lsq compares its sweep with a plain re-fit.

        Args:
            result: the sweep's result so far (``output_error_after`` is set); updated in place.
            backup: the pruned model as it was before recovery.
        """


@dataclass(frozen=True)
class RecoveryMethod:
    """One ``--recover`` choice.

    Attributes:
        name: the CLI value.
        help_text: what it does, in a few words (the CLI help lists them).
        fitter: makes the per-sweep fixer from the recovery job; None: the method changes nothing.
        needs_calibration: refused without ``--calib``.
        chooses_zeros: can choose which weights to zero while re-fitting (``--criterion obs`` needs this).
        ops: op types the sweep hands to the fitter (when downstream of a change).
        shortcut_first: fit a layer ending a residual branch after the shortcut it is fitted against
            (fit_order.py).
    """

    name: str
    help_text: str
    fitter: Callable[[Recovery], Fitter] | None
    needs_calibration: bool = True
    chooses_zeros: bool = False
    ops: frozenset[str] = frozenset()
    shortcut_first: bool = False


_REGISTRY: dict[str, RecoveryMethod] = {}
DEFAULT_HELP = "Default: lsq with --calib, else none."


def register(name: str, help_text: str, *, needs_calibration: bool = True, chooses_zeros: bool = False,
             ops: frozenset[str] = frozenset(), shortcut_first: bool = False
             ) -> Callable[[Callable[[Recovery], Fitter]], Callable[[Recovery], Fitter]]:
    """Register the decorated fitter factory (usually a class taking the recovery job) as method ``name``."""

    def decorate(fitter: Callable[[Recovery], Fitter]) -> Callable[[Recovery], Fitter]:
        add(RecoveryMethod(name, help_text, fitter, needs_calibration, chooses_zeros, ops, shortcut_first))
        return fitter

    return decorate


def add(method: RecoveryMethod) -> None:
    """Register ``method``; a name is registered once."""
    if method.name in _REGISTRY:
        raise ValueError(f"recovery method '{method.name}' is registered twice")
    _REGISTRY[method.name] = method


def get(name: str) -> RecoveryMethod:
    """The method called ``name``, or a ConfigError listing the choices."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown recovery '{name}' (choose from {', '.join(names())})")
    return _REGISTRY[name]


def names() -> list[str]:
    """Every method's name, in registration order (the CLI's choices)."""
    return list(_REGISTRY)


def methods() -> list[RecoveryMethod]:
    return list(_REGISTRY.values())


def cli_help() -> str:
    """The ``--recover`` help: every method in a few words, and the default."""
    listed = [f"{m.name} ({m.help_text}{', with --calib' if m.needs_calibration else ''})" for m in methods()]
    return f"Training-free recovery: {', '.join(listed[:-1])} or {listed[-1]}. {DEFAULT_HELP}"


def default_method(calibrated: bool) -> str:
    """Without ``--recover``: lsq when there is calibration data to fit on, else none."""
    return "lsq" if calibrated else "none"


def chosen_method(name: str | None, calibrated: bool) -> RecoveryMethod:
    """The method a run uses: ``name`` when given, else :func:`default_method`."""
    return get(name or default_method(calibrated))


add(RecoveryMethod("none", "leave the pruned weights as they are", None, needs_calibration=False))
