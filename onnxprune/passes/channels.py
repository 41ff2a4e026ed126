"""Structured removal as three passes: find the groups of coupled channels, choose what each loses, remove it."""

from __future__ import annotations

from onnxprune.channels.groups import build_groups
from onnxprune.errors import ConfigError
from onnxprune.importance import registry as criteria
from onnxprune.passes.base import Pass
from onnxprune.passes.state import GroupRow, PruneState
from onnxprune.passes.verify import verify
from onnxprune.prune.structured import apply_plan, cpu_block, plan_channels
from onnxprune.prune.verify import in_memory


ATTENTION_UNITS = ("heads", "head-dims")  # what --channels removes from attention (see build_groups)


class _ChannelPass(Pass[PruneState]):
    def applies(self, state: PruneState) -> bool:
        return state.options.prunes_channels


class BuildGroups(_ChannelPass):
    """Every group of coupled channels, from the per-op rules over the live graph."""

    name = "build-groups"

    def run(self, state: PruneState) -> None:
        units = state.options.attention_units
        if units not in ATTENTION_UNITS:
            raise ConfigError(f"attention units must be one of {', '.join(ATTENTION_UNITS)}, got '{units}'")
        state.groups = build_groups(state.index, head_dims=units == "head-dims")


class SelectChannels(_ChannelPass):
    """Score the channels with the chosen criterion and plan what each group loses (scope, overrides, rounding)."""

    name = "select-channels"

    def requires(self, state: PruneState) -> None:
        assert state.groups is not None and state.calibrated
        if state.options.budgets and state.planner is None:
            raise ConfigError("a --target-* budget is met by the budget search (onnxprune.search.budget."
                              "prune_to_budget), not by the ratio job")

    def run(self, state: PruneState) -> None:
        options = state.options
        state.report.round_to = options.round_to if options.round_to is not None else cpu_block()
        if state.planner is not None:  # a budget search's round chooses every group's count itself
            state.plan = state.planner(state)
            return
        scorer = criteria.channel_scorer(options.criterion, state.groups, options.reduction, state.batches)
        state.plan = plan_channels(state.groups, options.channels or 0.0, options.scope, scorer, options.reduction,
                                   state.report.round_to, options.exclude, options.layer_channels,
                                   options.max_group_ratio)


class RemoveChannels(_ChannelPass):
    """Apply the plan. Postcondition with ``--verify``: the pruned model equals the model before removal with the
    removed channels masked to zero (the exactness oracle); the reference is taken here, just before removal, with
    external data loaded (pruning may stream changes to the output's unfinished data file)."""

    name = "remove-channels"

    def requires(self, state: PruneState) -> None:
        assert state.plan is not None

    def run(self, state: PruneState) -> None:
        reference = in_memory(state.model) if state.verify_feeds is not None else None
        groups, plan = state.groups, state.plan
        state.kept = apply_plan(groups, plan)
        if reference is not None:
            state.proof = verify(reference, state.model, groups, plan, state.verify_feeds)
            del reference  # masked in place; freed before sparsity and recovery
        state.changed |= {d.tensor for d in state.kept if groups.index.is_constant(d.tensor)}
        state.report.groups = [GroupRow(g.id, g.name, g.producers, [f"{d.tensor}[{d.axis}]" for d in g.dims], g.size,
                                        g.size - len(plan.remove.get(g.id, ())), g.blocked, plan.notes.get(g.id))
                               for g in groups.groups]
        if not groups.prunable():
            state.report.notes.append("no channel group can be pruned (see the reasons above); channels are unchanged")
