"""Other formats and runtimes: ONNX export (``export``) and inference without the training stack
(``onnx_runtime``), and weights to and from open_clip (``convert``, with the name map in ``open_clip_map``).

Only the command line (``finderpartner.cli``) imports this package; the library layer (the top-level modules and
``data/``) does not (scripts/import_graph.py checks).
"""
