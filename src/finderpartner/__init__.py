"""FinderPartner: fine-tune a CLIP dual encoder on image-caption pairs, evaluate it, search a gallery."""

__version__ = "0.1.0"
