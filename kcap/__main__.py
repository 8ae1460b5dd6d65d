import sys

from kcap.cli import main

sys.exit(main())
