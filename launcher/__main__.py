"""``python -m puyu.launcher`` is the ``puyu`` command."""
from puyu.launcher.cli import main

main()
