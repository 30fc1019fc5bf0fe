"""A tiny stand-in for a LLaVA-code-base model package (Griffon-G's layout). Importing it registers
the config and model classes with transformers' Auto classes, as `import griffon` does."""

from griffon.model import GriffonGemma2Config, GriffonGemma2ForCausalLM  # noqa: F401
