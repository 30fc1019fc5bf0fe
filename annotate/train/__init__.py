"""PixCLIP training program: data, text-feature cache, trainer, evaluation, synthetic benchmark."""
