"""Trained models as folders in the Hugging Face Hub's layout, and ``hf://org/name`` references.

- :mod:`gce.sharing.names`: file names and the ``hf://`` reference (no imports);
- :mod:`gce.sharing.location`: what a ``--checkpoint`` names (a ``.pt``, a run folder, a model
  folder or ``hf://org/name[@revision]``) and the one resolver every loader goes through; torch-free;
- :mod:`gce.sharing.folder`: a model folder written and read (``model.safetensors``, ``config.json``,
  ``README.md``);
- :mod:`gce.sharing.card`: the ``README.md`` model card;
- :mod:`gce.sharing.hub`: the Hub itself (download into its cache, push), one-line errors.

Nothing is imported here: ``--help`` imports :mod:`gce.sharing.location` only.
"""
