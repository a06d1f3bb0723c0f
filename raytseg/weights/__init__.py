"""Model weights: where they live, how they get there, and random stand-ins for tests.

- ``store``: :class:`~raytseg.weights.store.WeightsStore` resolves a ``ModelSpec`` to its
  nnU-Net model folder (local, or fetched from ``s3://…``/``https://…zip`` into a cache).
- ``fetch``: downloads TotalSegmentator's published and licensed zips, imports local zips.
- ``license``: TotalSegmentator-compatible license key in ``<totalseg_home>/config.json``.
- ``synth``: random-weight model folders in the exact nnU-Net v2 format (imports torch).

Importing this package, ``store``, ``fetch`` or ``license`` does not import torch.
"""
