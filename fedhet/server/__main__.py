"""``python -m fedhet.server [--resume] [KEY=VALUE ...]``: the same as ``fedhet server``."""

import sys

from fedhet.server.app import main

sys.exit(main(sys.argv[1:]))
