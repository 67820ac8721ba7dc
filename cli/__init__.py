"""The ``fishmerge`` command line (shipped as ``fishmerge.cli``)."""
