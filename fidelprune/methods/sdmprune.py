"""SDMPrune: self-distillation Taylor importance in two stages (docs/methods.md, "SDMPrune").

Stage 1 scores with next-token CE in the weight-element form and cuts each prunable layer to 97.5 % of its
neurons (never below the final width), a uniform cut whatever the final allocation. Stage 2 scores the stage-1
model (the original with those neurons masked) with KD to the original (the same weights with the mask hooks
off, so no second copy exists), mixed with CE, and chooses the final neurons among the stage-1 survivors.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapters import AdaptedModel
from ..allocation import AllocationConfig, WidthPlan, select_neurons
from ..objectives import KD, get_objective
from ..scoring import taylor_scores
from .base import GradientMethod, MethodConfig, MethodResult, iterative_select, register_method, survivors_only


class SDMPrune(GradientMethod):
    def stage_objectives(self, config) -> list[str]:
        # stage 2 (config.steps passes with --steps) is skipped when stage 1 already reaches the final width
        return ["ce"] + [config.objective] * config.steps

    def score(self, adapted: AdaptedModel, windows: torch.Tensor | None, config: MethodConfig, plan: WidthPlan,
              allocation: AllocationConfig, progress: bool = True) -> MethodResult:
        common = dict(batch_size=config.batch_size, progress=progress)
        stage1_plan = replace(plan, width_after=max(plan.width_after, int(config.stage1_keep * plan.width_before)))
        stage1_only = stage1_plan.width_after == plan.width_after and allocation.kind == "uniform"
        # Stage 1 runs the original model, stage 2's teacher, on the same windows: it keeps the last layer's output
        # so that stage 2 gets the teacher's logits from the head alone (scoring.taylor_scores).
        teacher_hidden = None if stage1_only else []
        stage1 = taylor_scores(adapted, windows, get_objective("ce"), config.form, teacher_hidden=teacher_hidden,
                               description="stage 1 (ce)", **common)
        survivors = select_neurons(stage1, stage1_plan, replace(allocation, kind="uniform"))
        stages = [{"name": "stage1", "objective": "ce", "form": config.form, "keep": stage1_plan.width_after}]
        extra = {f"stage1.layer.{i}": s for i, s in stage1.items()}
        if stage1_only:
            return MethodResult(stage1, survivors, extra, stages)
        if config.steps > 1:  # stage 2 as iterative pruning, from the stage-1 width to the final one
            result = iterative_select(adapted, windows, config, plan, allocation, kept=survivors,
                                      width_before=stage1_plan.width_after, name="stage2-step", progress=progress,
                                      teacher_hidden=teacher_hidden)
            return MethodResult(result.scores, result.kept, {**extra, **result.extra_scores}, stages + result.stages)
        stage2 = taylor_scores(
            adapted, windows, KD(config.alpha, config.temperature), config.form, mask=survivors, needs_teacher=True,
            teacher_hidden=teacher_hidden, description="stage 2 (kd)", **common,
        )
        # neurons stage 1 removed rank below every survivor
        ranked = {i: survivors_only(score, survivors[i]) for i, score in stage2.items()}
        stages.append({"name": "stage2", "objective": "kd", "form": config.form, "alpha": config.alpha,
                       "temperature": config.temperature})
        return MethodResult(ranked, select_neurons(ranked, plan, allocation, survivors), extra, stages)


# The objective is stage 2's; stage 1 is ("ce", the same form).
register_method(SDMPrune("sdmprune", objective="kd", form="weight-element",
                         summary="stage 1 CE to 97.5 %, stage 2 KL-to-original mixed with CE; weight-element form"))
