"""Slice-by-slice propagation of box prompts through a volume.

The stages, one module each:

* :mod:`.config`: :class:`PropagationConfig`, the engine's settings (frozen), and its speed
  preset :meth:`PropagationConfig.fast`;
* :mod:`.encoder`: :class:`SliceEncoder`, each slice encoded once and cached (one encoding
  serves every object), encoded ahead in batches along a walk;
* :mod:`.engine`: :func:`propagate`, per object: the prompted slices (each one's final mask
  the majority over its box grown by 0-3 pixels, so that it does not depend on how tightly
  the box was drawn), the walk, the vote;
* :mod:`.sections` and :mod:`.walk`: by default (``PropagationConfig.orthogonal``) every
  slice's box comes from orthogonal sections through the object; with
  ``PropagationConfig.stride`` > 1 only every stride-th slice and the ends are encoded at
  first;
* :mod:`.gaps`: the slices between are interpolated where their segmented neighbours agree
  and segmented where they do not (with ``PropagationConfig.blend_embeddings``, decoded on
  blended neighbour embeddings instead of being encoded);
* :mod:`.chains`: box chains with two margins, each once with a fixed box and once with a
  box moved with the image, walk the slices the sections segmented, and each slice keeps the
  pixels that most of the five agree on; their spread gives the object's alternative volumes;
* :mod:`.stops`: where an object ends. Without a z_range, an object that stands out from its
  surroundings on the prompted slice also ends where a slice's mask no longer holds what it
  held there; the box chain (``orthogonal=False`` only) stops on an empty or small, less
  certain mask, a low quality score, or a jump in area or position;
* :mod:`.boxes`: boxes and masks on one slice.
"""

from .boxes import expand_box, mask_box
from .config import PropagationConfig
from .encoder import SliceEncoder
from .engine import propagate
from .results import ObjectResult, SliceResult

__all__ = ["ObjectResult", "PropagationConfig", "SliceEncoder", "SliceResult", "expand_box", "mask_box",
           "propagate"]
