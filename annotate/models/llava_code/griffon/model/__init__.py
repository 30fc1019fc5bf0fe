from griffon.model.griffon_gemma import GriffonGemma2Config, GriffonGemma2ForCausalLM  # noqa: F401
