"""The annotation chain, one file per stage, in the order of the paper's pipeline."""

from annotate.stages.base import PromptTemplate, RegionContext, Stage
from annotate.stages.context import ContextStage
from annotate.stages.merge import MergeStage
from annotate.stages.object import ObjectStage
from annotate.stages.validate import ValidateStage

STAGE_CLASSES: dict[str, type[Stage]] = {
    cls.name: cls for cls in (ObjectStage, ValidateStage, ContextStage, MergeStage)
}

__all__ = ["STAGE_CLASSES", "PromptTemplate", "RegionContext", "Stage", "stage_class"]


def stage_class(name: str, override: str | None = None) -> type[Stage]:
    """The class that runs stage `name`: the built-in one, or `module:Class` from the stage's config."""
    if override is None:
        return STAGE_CLASSES[name]
    import importlib

    module, _, attr = override.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Stage) and cls.name == name):
        raise ValueError(f"stage_class {override!r} must be a Stage subclass named {name!r}")
    return cls
