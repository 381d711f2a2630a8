"""The model card and publishing: ``render`` (the card from a saved checkpoint), ``facts`` (what
the saved files say), ``reproduce`` (the command that reproduces a run), ``plots``,
``markdown`` (escaping user text) and ``hub`` (push in one commit)."""

from .render import CardInfo, render_card, write_card

__all__ = ["CardInfo", "render_card", "write_card"]
