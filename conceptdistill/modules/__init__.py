"""The LightningModules the stages run (masker, fine-tuner, inpainter, synthesizer, segmenter) and their
callbacks. They know nothing of run folders or configs: a stage builds them and feeds them data."""
