import sys

from lmwright.cli import main

sys.exit(main())
