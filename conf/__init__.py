"""The Hydra config tree (``pkg://puyu.conf``): groups mirror the code folders."""
