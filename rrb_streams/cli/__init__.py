"""The commands: one module per command family, on top of everything else.

``backup`` (``rrb``, ``rrb-bridge``, ``rrb-upload``), ``restore``, ``verify`` and ``status``
each parse their options, set up logging, build a config, and run. ``options`` holds the
option groups they share, ``common`` the parser, the error handling and the run sequence.
"""
