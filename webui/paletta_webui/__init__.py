"""Paletta web page: a thin NiceGUI client of the Paletta SDK (never imports the server).

Run it with ``python -m paletta_webui --address 127.0.0.1:50051 --port 8080``.
"""
