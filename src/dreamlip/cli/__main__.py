"""``python -m dreamlip.cli`` (what torchrun and the tests launch)."""

import sys

from dreamlip.cli import main

sys.exit(main())
