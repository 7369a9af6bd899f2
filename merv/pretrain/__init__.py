"""Tiny specialised encoders trained in the pipeline (the ``pretrain_encoder`` stage, ``merv pretrain``).

:mod:`merv.pretrain.data` renders the pretext data, :mod:`merv.pretrain.config` is the stage's typed config and
points a model's encoders at pretrained weights, :mod:`merv.pretrain.train` trains, saves and checks an encoder.
"""
