"""The experiments: scripts over the library (`python experiments/<name>.py` once the
project is installed, or `python -m experiments.<name>`), each also importable as a module."""
