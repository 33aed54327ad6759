"""Protobuf classes of the ``events`` package, generated from ``proto/events/*.proto``.

Do not edit: run ``python scripts/gen_proto.py`` after changing a ``.proto`` file.
"""
