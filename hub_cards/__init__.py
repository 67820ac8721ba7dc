"""Jinja templates of the model cards fishmerge writes (shipped as ``fishmerge.hub_cards``)."""
