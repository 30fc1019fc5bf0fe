"""One training job: what to train, on what data, and where, as one object passed whole from the
command to the trainer (and, as JSON, to every Ray Train worker)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, model_validator

from annotate.config import TrainConfig


class TrainJob(BaseModel):
    cfg: TrainConfig
    output: Path  # the run folder: checkpoints/, run.json
    data: Path | None = None  # a pipeline output folder (its dataset files are read through the store)
    synthetic: bool = False  # the synthetic benchmark instead of `data`
    max_steps: int | None = None  # stop after this many optimizer steps (else the config's)
    resume: bool = False  # continue from the run's latest checkpoint
    text_cache: Path | None = None  # `annotate embed-text` output (else cfg.text_embed_cache)

    @model_validator(mode="after")
    def _has_data(self) -> "TrainJob":
        if not self.synthetic and self.data is None:
            raise ValueError("give --data OUT (a pipeline output) or --synthetic")
        return self

    def wire(self) -> dict:
        """The job as JSON for another process, only the settings that were given: `build_pixclip` reads
        the unset ones (joint width, adaptor shape, temperature) from the checkpoint, so a worker must
        not see the defaults as if the user had written them."""
        return self.model_dump(mode="json", exclude_unset=True)

    def resolved(self) -> "TrainJob":
        """The same job with absolute paths, for workers whose working folder is not ours."""
        def absolute(path: Path | None) -> Path | None:
            return path.resolve() if path is not None else None

        return self.model_copy(update={"output": self.output.resolve(), "data": absolute(self.data),
                                       "text_cache": absolute(self.text_cache)})
