"""Passes: the prune job as a sequence of small steps over one shared state.

Modelled on onnx-ir's ``PassBase``: each pass says when it applies, checks what it needs before it runs
(``requires``) and what it promises after (``ensures``), and an unexpected failure inside it is reported with the
pass's name. A new step (quantization, attention heads, a budget search) is a new pass in the sequence; no other
pass changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

from onnxprune.errors import OnnxPruneError, Terminated

State = TypeVar("State")


class PassFailed(OnnxPruneError):
    """An unexpected error inside a pass: a bug, reported with the pass's name (exit 1)."""

    exit_code = 1


class Pass(ABC, Generic[State]):
    """One step of a job. Subclasses set ``name`` and implement :meth:`run`; the rest is optional."""

    name: str = "pass"

    def applies(self, state: State) -> bool:
        """Whether the options ask for this step at all (a pass that does not apply is skipped silently)."""
        return True

    def requires(self, state: State) -> None:
        """Precondition: raise an :class:`OnnxPruneError` when the state cannot be worked on."""

    @abstractmethod
    def run(self, state: State) -> None:
        """Do the step, changing ``state`` in place."""

    def ensures(self, state: State) -> None:
        """Postcondition: raise an :class:`OnnxPruneError` when the step's promise does not hold."""


def run_passes(passes: Sequence[Pass[State]], state: State) -> State:
    """Run each applicable pass with its pre- and postcondition; failures that are not the tool's own expected errors
    are wrapped with the pass's name, so a report says which step broke."""
    for step in passes:
        if not step.applies(state):
            continue
        try:
            step.requires(state)
            step.run(state)
            step.ensures(state)
        except (OnnxPruneError, Terminated, KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # a bug inside the step: say which one
            raise PassFailed(f"internal error in pass '{step.name}': {type(exc).__name__}: {exc} (rerun with --debug "
                             "for details; please report this with the model)") from exc
    return state
