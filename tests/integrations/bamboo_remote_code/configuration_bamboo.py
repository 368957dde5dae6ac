"""Bamboo's hub remote code (PowerInfer/Bamboo-base-v0.1, TurboSparse-Mistral), reconstructed for the tests: a
fork of transformers 4.41's Mistral of May 2024 with model type "bamboo". bamboo never imports this file;
transformers loads it from a checkpoint directory with trust_remote_code=True, as users load the hub model."""
from transformers.models.mistral.configuration_mistral import MistralConfig


class BambooConfig(MistralConfig):
    model_type = "bamboo"
