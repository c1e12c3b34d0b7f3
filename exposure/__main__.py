import sys

from exposure.ops.cli import main

sys.exit(main())
