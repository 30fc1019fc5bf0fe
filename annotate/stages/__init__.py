"""The annotation chain, one file per stage, in the order of the paper's pipeline."""

from annotate.stages.base import PromptTemplate, RegionContext, Stage
from annotate.stages.context import ContextStage
from annotate.stages.merge import MergeStage
from annotate.stages.object import ObjectStage
from annotate.stages.validate import ValidateStage

STAGE_CLASSES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (ObjectStage, ValidateStage, ContextStage, MergeStage)
}

__all__ = ["STAGE_CLASSES", "PromptTemplate", "RegionContext", "Stage"]
