"""The ``ecg-audio`` command: the top layer, over the core, the ops tools, the tasks and the worker."""
