"""Test and demo scaffolding: a synthetic image-caption world with near-miss pairs, and a tiny CLIP pretrained on it.

Not part of the service: core, api, worker and helip's service modules never import it (the CLI's `synth`
and `pretrain` commands and the demo do).
"""
