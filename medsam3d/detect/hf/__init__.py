"""Learned open-vocabulary detectors through Hugging Face ``transformers`` (the ``detect`` extra).

``grounding-dino`` (:mod:`.grounding_dino`), ``kosmos-2`` (:mod:`.kosmos2`) and ``sam3``
(:mod:`.sam3`) look at the slices of a volume one by one (every ``stride``-th, then around
their hits), and :func:`medsam3d.detect.find_tracks` links their boxes into 3D objects.
Weights are read from a local folder or the Hugging Face cache, never downloaded
(:func:`.common.resolve_weights`).
"""
