"""The MedSAM3D module's library: ``bridge`` (Slicer nodes <-> medsam3d's data), ``client``
(the medsam3d server's HTTP API, standard library only), ``backends`` (in-process or server),
``install`` (medsam3d into Slicer's Python, on request) and ``phantom`` (the self-test's data).

Nothing is imported here: importing the package never imports medsam3d, torch or Slicer.
"""
