"""Follow-up of tumours over time: register the studies of a patient, match their lesions, and
categorise the response (RECIST 1.1 and a volumetric analogue); carry a segmentation from one
study onto another as prompts.

    from medsam3d.followup import follow_up, transfer_prompts
    results = follow_up(studies, load_image=load_by_case_id)     # one dict per (patient, modality)
    prompts, registration = transfer_prompts(baseline_labels, baseline_image, followup_image)

See ``docs/followup.md`` for the rules as implemented.
"""

from __future__ import annotations

from .follow import follow_up
from .match import MATCHING_RULE
from .register import Registration, register_rigid
from .response import DEFAULT_THRESHOLDS, RECIST_RULE, VolumetricThresholds
from .transfer import transfer_prompts

__all__ = ["DEFAULT_THRESHOLDS", "MATCHING_RULE", "RECIST_RULE", "Registration", "VolumetricThresholds", "follow_up",
           "register_rigid", "transfer_prompts"]
